"""Rules whose module's backward the tracker replaces by one fused op.

For nn.Linear and convolutions the weight gradient Σ_i G_i and the
per-sample norms ‖G_i‖² come out of one pass of the fused kernel
(docs/design.md §1); for GroupNorm the per-sample γ and β gradients are
by-products of the sums its backward computes anyway. Either way, measuring the norms
costs the kernel's epilogue instead of a second pass over (x, dY). The
module's forward is routed through `_FusedBackwardFunction`, whose backward
asks the tracker (the "sink") for the gradients; the sink runs the rule's
fused backward when the call is the module's only one in the step, and the
plain backward otherwise (the norms of a module called several times are
computed at the end of backward, over all its calls).

Where the norms cost next to nothing beside the backward (a Linear layer
with one position per sample: ‖G_i‖² = ‖x_i‖²‖dy_i‖², O(B(d + p))), the
rule keeps autograd's backward and the norms come from a hook on the
output's gradient: a Python autograd Function's forward and backward would
cost more than the norms themselves.
"""
from __future__ import annotations

import types
import typing
import weakref
from abc import abstractmethod

import torch
from torch import nn

from . import batching
from .base import NormRule
from .calls import Call


class FusedBackwardRule(NormRule):
    """A NormRule that can also stand in for its module's backward."""

    replaces_backward = True

    def supports_fused_backward(self, module: nn.Module) -> bool:
        """Whether this module's configuration can use the fused backward."""
        return True

    def keeps_autograd_backward(self, module: nn.Module, x: torch.Tensor) -> bool:
        """Whether this call keeps autograd's backward, its norms then coming
        from `norms_from_output_grad` (when they are cheap beside it)."""
        return False

    def norms_from_output_grad(self, module: nn.Module, x: torch.Tensor,
                               grad_out: torch.Tensor, params: list[str]) -> torch.Tensor:
        """Per-sample sq norms [B] of `params` from such a call's input and
        output gradient: the rule's `sq_norms` of that one call."""
        return self.sq_norms(module, [Call((x,), {}, [grad_out])], params)

    @abstractmethod
    def forward(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        """(the module's output, bit for bit; tensors the backward needs besides
        x and weight, e.g. normalisation statistics)."""

    @abstractmethod
    def fused_backward(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None,
                       saved: tuple, grad_out: torch.Tensor, params: list[str],
                       need_input_grad: bool):
        """(grad_x or None, grad_weight or None, grad_bias or None, per-sample
        sq norms [B] of the parameters in `params`, in float32 or float64)."""

    @abstractmethod
    def plain_backward(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None,
                       saved: tuple, grad_out: torch.Tensor, need_input_grad: bool,
                       need_weight: bool, need_bias: bool):
        """(grad_x or None, grad_weight or None, grad_bias or None) without norms."""


class FusedBackwardSink(typing.Protocol):
    """What the fused forward and backward ask of the tracker that installed
    them: a private interface, so that the tracker's public API is not it.

    - `_sink_wants(module, x)`: the step that measures this call, or None;
    - `_sink_backward(module, step, x, weight, saved, grad_out, need_input_grad,
      need_weight, need_bias)`: (grad_x, grad_weight, grad_bias), with the norms
      recorded when the call can be measured by the rule's fused backward;
    - `_sink_watch_output(module, step, x, out)`: a call that keeps autograd's
      backward, its norms from the output's gradient;
    - `_sink_shared_call(module, step, args, kwargs, shared, out, kind)`: a call
      on an input shared by every sample (layers.broadcast);
    - `_sink_unmeasurable(step)`: a backward with create_graph=True.
    """

    def _sink_wants(self, module, x): ...
    def _sink_backward(self, module, step, x, weight, saved, grad_out, need_input_grad,
                       need_weight, need_bias): ...
    def _sink_watch_output(self, module, step, x, out): ...
    def _sink_shared_call(self, module, step, args, kwargs, shared, out, kind): ...
    def _sink_unmeasurable(self, step): ...


class _FusedBackwardFunction(torch.autograd.Function):
    """The module's forward; backward hands (x, dY) to the sink, which returns
    the gradients (from the rule's fused backward, with the norms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, rule, sink, step):
        out, saved = rule.forward(module, x, weight, bias)
        ctx.save_for_backward(x, weight, *saved)
        ctx.module, ctx.rule, ctx.sink, ctx.step = module, rule, sink, step
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, Hessian-vector products):
            # the fused kernels have no derivative of their own, so the
            # gradients come from autograd through a re-run of the forward,
            # differentiable; such a backward is not measured.
            ctx.sink._sink_unmeasurable(ctx.step)
            return _differentiable_backward(ctx, x, weight, grad_out) + (None,) * 4
        grad_x, grad_w, grad_b = ctx.sink._sink_backward(
            ctx.module, ctx.step, x, weight, tuple(saved), grad_out, need_x, need_w,
            ctx.has_bias and need_b)
        # (dtype checks first: a no-op .to still costs a call on every layer)
        if grad_x is not None and grad_x.dtype != x.dtype:
            grad_x = grad_x.to(x.dtype)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != ctx.module.bias.dtype:
            grad_b = grad_b.to(ctx.module.bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _differentiable_backward(ctx, x, weight, grad_out):
    bias = ctx.module.bias if ctx.has_bias else None
    return differentiable_grads(
        lambda x, weight, bias: ctx.rule.forward(ctx.module, x, weight, bias)[0],
        (x, weight, bias), ctx.needs_input_grad[:3], grad_out, ctx.autocast)


def differentiable_grads(forward, inputs: tuple, needed, grad_out, autocast) -> tuple:
    """The gradients of `forward(*inputs)` with respect to the inputs marked
    in `needed` (None for the others), differentiable (create_graph=True),
    from a re-run of the forward under its autocast state (device, enabled,
    dtype): a fused kernel has no derivative of its own."""
    wanted = [k for k, (t, need) in enumerate(zip(inputs, needed)) if t is not None and need]
    device, enabled, dtype = autocast
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        out = forward(*inputs)
        grads = torch.autograd.grad(out, [inputs[k] for k in wanted], grad_out,
                                    create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for k, g in zip(wanted, grads):
        result[k] = g
    return tuple(result)


# Modules whose forward is routed through _FusedBackwardFunction: module ->
# (rule, weak reference to the sink). Weak both ways (the sink, a tracker,
# holds the model), so that it never keeps a module or a tracker alive; a
# copy of a module (copy.deepcopy, pickling) is not in it and runs its own
# plain forward.
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def installed_sink(module: nn.Module):
    """The live sink whose fused forward `module` runs, or None."""
    entry = _INSTALLED.get(module)
    return None if entry is None else entry[1]()


def forward(self, *args, **kwargs):
    """The forward of a module whose backward the tracker takes over; set on
    the instance (bound to it, so that a deep copy is bound to the copy)."""
    entry = _INSTALLED.get(self)
    plain_forward = type(self).forward
    sink = None if entry is None else entry[1]()
    if sink is None or len(args) + len(kwargs) != 1:
        return plain_forward(self, *args, **kwargs)
    rule = entry[0]
    x = args[0] if args else next(iter(kwargs.values()))
    step = sink._sink_wants(self, x)
    if step is None:
        return plain_forward(self, *args, **kwargs)
    kind = batching.layout(x, step.batch_size)
    if kind not in (batching.BATCH, batching.ROWS):
        # an input shared by every sample: one sample's worth of work
        out = plain_forward(self, *args, **kwargs)
        if out.requires_grad:
            sink._sink_shared_call(self, step, (x,), {}, frozenset(), out, kind)
        return out
    if kind == batching.ROWS and rule.rowwise:
        rows = _FusedBackwardFunction.apply(batching.split_rows(x, step.batch_size), self.weight,
                                            getattr(self, "bias", None), self, rule, sink, step)
        # not a view: a view of an autograd Function's output cannot be modified in place
        return torch.ops.aten._unsafe_view(rows, (x.shape[0], *rows.shape[2:]))
    if rule.keeps_autograd_backward(self, x):
        out = plain_forward(self, *args, **kwargs)
        if out.requires_grad:
            sink._sink_watch_output(self, step, x, out)
        return out
    return _FusedBackwardFunction.apply(x, self.weight, getattr(self, "bias", None),
                                        self, rule, sink, step)


def is_tracked_forward(fn) -> bool:
    """Whether `fn` (a module's instance attribute `forward`) is the one
    install_tracked_forward sets."""
    return getattr(fn, "__func__", None) is forward


def replaced_forward(module: nn.Module) -> bool:
    """Whether the module's instance carries a forward of its owner's own:
    not the tracker's, nor its type's own bound to it (what unpickling a
    tracked module leaves)."""
    fn = module.__dict__.get("forward")
    if fn is None or is_tracked_forward(fn):
        return False
    return not (getattr(fn, "__func__", None) is type(module).forward
                and getattr(fn, "__self__", None) is module)


def install_tracked_forward(module: nn.Module, rule: FusedBackwardRule, sink: FusedBackwardSink,
                            name: str) -> None:
    """Route the module's training-step forward through _FusedBackwardFunction;
    `sink` (a GradNoiseTracker) implements `FusedBackwardSink`. Outputs are the
    module's."""
    if installed_sink(module) is not None:
        raise ValueError(
            f"GradNoiseTracker: module '{name}' ({type(module).__name__}) is already measured by "
            "another attached GradNoiseTracker. Detach that one first, or share one tracker "
            "(GradientNoiseScale(model, tracker=tracker) reads an existing one).")
    if replaced_forward(module):
        raise ValueError(
            f"GradNoiseTracker: module '{name}' ({type(module).__name__}) had its forward replaced "
            "on the instance after the tracker was built; build the tracker after replacing it.")
    _INSTALLED[module] = (rule, weakref.ref(sink))
    module.forward = types.MethodType(forward, module)


def remove_tracked_forward(module: nn.Module) -> None:
    _INSTALLED.pop(module, None)
    if "forward" in module.__dict__ and not replaced_forward(module):
        del module.forward
