"""Rules whose module's backward the tracker replaces by one fused op.

For nn.Linear and convolutions the weight gradient Σ_i G_i and the
per-sample norms ‖G_i‖² come out of one pass of the fused kernel (DESIGN.md
section 1); for GroupNorm the per-sample γ and β gradients are by-products
of the sums its backward computes anyway. Either way, measuring the norms
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

from abc import abstractmethod

import torch
from torch import nn

from .base import Call, NormRule


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


class _FusedBackwardFunction(torch.autograd.Function):
    """The module's forward; backward hands (x, dY) to the sink, which returns
    the gradients (from the rule's fused backward, with the norms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, rule, sink, step):
        out, saved = rule.forward(module, x, weight, bias)
        ctx.save_for_backward(x, weight, *saved)
        ctx.module, ctx.sink, ctx.step, ctx.has_bias = module, sink, step, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = ctx.sink.module_backward(
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


def install_tracked_forward(module: nn.Module, rule: FusedBackwardRule, sink) -> None:
    """Route the module's training-step forward through _FusedBackwardFunction.

    `sink.wants(module, x)` gives the step that measures this call (None: not
    measured); `sink.module_backward(module, step, x, weight, saved, grad_out,
    need_input_grad, need_weight, need_bias)` computes the gradients; for
    calls that keep autograd's backward, `sink.watch_output(module, step, x,
    out)` takes the norms from the output's gradient. Outputs are the module's.
    """
    plain_forward = type(module).forward

    def forward(x):
        step = sink.wants(module, x)
        if step is None:
            return plain_forward(module, x)
        if rule.keeps_autograd_backward(module, x):
            out = plain_forward(module, x)
            if out.requires_grad:
                sink.watch_output(module, step, x, out)
            return out
        return _FusedBackwardFunction.apply(x, module.weight, getattr(module, "bias", None),
                                            module, rule, sink, step)
    module.forward = forward


def remove_tracked_forward(module: nn.Module) -> None:
    if "forward" in module.__dict__:
        del module.forward
