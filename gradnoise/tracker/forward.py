"""GradNoiseTracker's forward side: each measured forward starts a step, and
each tracked call is recorded, captured from its functional calls, or
watched as a contribution shared by the batch (docs/design.md §6)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import layers
from ..layers import batching
from ..layers.calls import Call, output_tensors
from ..model_structure import batchnorm_mixing, mixes_samples
from .plan import _batchnorm_message, _Tracked
from .step import _Step


class _ForwardHooks:
    """The forward hooks of GradNoiseTracker (a mixin: the state is the tracker's)."""

    # ------------------------------------------------------------------ hooks
    def _measuring(self) -> bool:
        # Every call in a measured step counts, modules in eval mode included
        # (their parameters get gradients all the same). Nothing is measured
        # inside torch.func transforms (vmap, grad, ...): those are someone
        # else's per-sample computations.
        return (self._step is not None and not self._step.finished and not self._eval_forward
                and not self._suspended and torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active())

    def _on_model_forward(self, model, args, kwargs) -> None:
        # A model may keep some submodules (e.g. BatchNorm) in eval mode while
        # the rest trains: the step is measured if any tracked module trains,
        # and then every tracked call counts. A forward in eval mode captures
        # nothing (it may come between a training forward and its backward);
        # the flag holds until the next forward of the model.
        self._eval_forward = False
        if self.paused:
            self._step = None
            return
        if not (torch.is_grad_enabled() and not self._suspended
                and not torch._C._are_functorch_transforms_active()):
            return
        if model.training or any(t.module.training for t in self._tracked):
            self._step = _Step(batch_size=batching.model_batch_size(args, kwargs))
            if self._outside_check_pending and torch.compiler.is_compiling():
                # a compiled forward is one autograd node per graph: the check cannot see
                self._outside_check_pending = False
                torch.compiler.disable(_warn_outside_uses_unchecked)()
            elif self._outside_check_pending:
                measured, own = self._measured_by()
                self._step.outside = layers.outside_uses.OutsideUses(measured, model, own)
        else:
            self._eval_forward = True

    def _on_model_forward_end(self, model, args, out) -> None:
        if self._step is None:
            return
        self._step.watch.leave()
        check, self._step.outside = self._step.outside, None
        if check is None:
            return
        found = check.find(output_tensors(out)) if out is not None else None
        if found == []:
            self._outside_check_pending = False
        if found:
            uses = "; ".join(f"'{name}' by an op whose backward is {op}"
                             for name, op in dict.fromkeys(found))
            raise RuntimeError(
                f"GradNoiseTracker: parameters are used outside the forward of the modules that "
                f"measure them ({uses}), so part of their per-sample gradients would be missed. "
                "Use a parameter only inside a module that owns it (call the module, or register "
                "a rule for the module that uses it: gradnoise.layers.register_rule), leave it "
                "out with `layers=`, or use the micro-batch noise source.")

    def _measured_by(self):
        """({id(tracked parameter) -> (its qualified name, the modules that
        measure it)}, {id(module) -> [(parameter name, that entry)]}): the
        parameters as planned, and by name for the objects a module holds
        when it runs (layers.outside_uses.OutsideUses)."""
        measured: dict[int, tuple[str, list[nn.Module]]] = {}
        own: dict[int, list[tuple[str, tuple]]] = {}
        for t in self._tracked:
            for n in t.own:
                pid = t.param_ids[n]
                name = f"{t.name}.{n}" if t.name else n
                entry = measured.setdefault(pid, (name, []))
                entry[1].append(t.module)
                own.setdefault(id(t.module), []).append((n, entry))
        return measured, own

    def _on_batchnorm_forward(self, module: nn.Module) -> None:
        if self._measuring() and mixes_samples(module):
            raise RuntimeError(_batchnorm_message(batchnorm_mixing(self.model)))

    def _on_capture_start(self, t: _Tracked) -> None:
        # (a forward re-run inside backward, by activation checkpointing, feeds no gradient
        # to its outputs' hooks: it is not watched)
        if not (t.capture and self._measuring()) or torch._C._current_graph_task_id() != -1:
            return
        if torch.compiler.is_compiling():
            self._stop_capture(t, "its forward is traced by torch.compile, under which its "
                                  "functional calls cannot be watched")
            return
        step = self._step
        if step.batch_size is None:
            self._stop_capture(t, "the model's forward has no tensor input to read the batch from")
            return
        if id(t.module) not in step.uses:
            step.uses[id(t.module)] = []
            for n in t.own:
                step.param_hooks.append(t.module.get_parameter(n).register_hook(
                    lambda g, n=n: self._on_captured_param_grad(step, t, n)))
        params = {n: t.module.get_parameter(n) for n in t.own}
        lent = {n: t.module.get_parameter(n) for n in t.lent}
        capture = layers.functional.ParameterUses(
            params, lent, lambda: not self._borrowers_running, step.batch_size,
            lambda cap, use, g: self._on_use_grad(step, t, cap, use, g),
            (lambda cap, use: self._on_fused_use(step, t, cap, use)) if self._fused_backward
            else None)
        step.capturing.setdefault(id(t.module), []).append(capture)
        step.watch.need().captures.append(capture)

    def _end_capture(self, t: _Tracked) -> bool:
        """At the end of a captured call: whether its uses measure it."""
        stack = self._step.capturing.get(id(t.module)) if self._step is not None else None
        if not stack:
            return False
        capture = stack.pop()
        watch = self._step.watch
        watch.captures.remove(capture)
        if not watch.captures and watch.broadcast is None:
            watch.leave()       # the rest of the forward runs without the mode
        if capture.lent_use is not None:
            name = capture.lent_use
            raise RuntimeError(
                f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) uses its "
                f"parameter '{name}' in its own forward, but '{t.lent[name]}' inside it also owns "
                "it and is measured from its own calls only, so part of the parameter's "
                "per-sample gradient would be missed. Leave one of the two out with `layers=`, or "
                "use the micro-batch noise source.")
        if capture.unsupported is not None:
            self._stop_capture(t, f"its forward calls {capture.unsupported} on its parameters")
            if self._step.uses[id(t.module)]:
                # an earlier call of this step was measured from its uses, which the
                # fallback cannot add to: this step is not measured (the next ones are)
                self._step.unmeasurable = (
                    f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) was called "
                    f"several times in the last step and one call fell back to re-running its "
                    f"forward ({self.fallback_reasons[t.name]}), so that step was not measured; "
                    "from the next step on every call is measured that way.")
            return False
        capture.armed = True
        self._step.uses[id(t.module)].extend(capture.uses)
        return True

    def _on_use_grad(self, step: _Step, t: _Tracked, capture, use, grad) -> None:
        if not capture.armed:
            return
        step = self._enter_backward(step)
        if step is None:
            return
        use.grad = grad
        if self._only_use(step, t, use):
            self._step_add(step, t, layers.functional.sq_norms(use, step.batch_size),
                           step.batch_size)
            use.release()
        # else at the end of backward, summed over the uses

    def _on_fused_use(self, step: _Step, t: _Tracked, capture, use):
        """Asked by a use run through the fused kernel, at its backward: a
        function that takes its norms if it is measured alone, else None."""
        if not capture.armed:
            return None
        step = self._enter_backward(step)
        if step is None or not self._only_use(step, t, use):
            return None

        def add(norms):
            self._step_add(step, t, norms, step.batch_size)
            use.release()
        return add

    @staticmethod
    def _only_use(step: _Step, t: _Tracked, use) -> bool:
        """Whether each parameter of `use` has no other use in the step."""
        uses = step.uses[id(t.module)]
        return all(sum(n in u.names() for u in uses) == 1 for n in use.names())

    def _on_captured_param_grad(self, step: _Step, t: _Tracked, name: str) -> None:
        if step.finished or not t.capture or step is not self._step:
            return
        if not any(name in u.names() for u in step.uses[id(t.module)]):
            raise RuntimeError(
                f"GradNoiseTracker: parameter '{name}' of module '{t.name}' "
                f"({type(t.module).__name__}) received a gradient through a call that gradnoise "
                "did not see (a custom autograd Function?), so its per-sample norms are unknown. "
                "Register a rule for the module (gradnoise.layers.register_rule), or leave it out "
                "with `layers=` or unsupported='skip'.")

    def _on_forward(self, t: _Tracked, args, kwargs, out):
        """Record the call (nothing to record if its functional calls measure it)."""
        if not self._measuring():
            return None
        if t.capture and self._end_capture(t):
            return None
        flat = output_tensors(out)
        index = [k for k, o in enumerate(flat) if o.requires_grad]
        if not index:
            return None
        shared = frozenset()
        if isinstance(t.rule, layers.generic.GenericRule):
            # the model's own tensors passed as inputs: never per-sample
            state = self._step.state_ids
            if state is None:
                state = self._step.state_ids = ({id(p) for p in self.model.parameters()}
                                                | {id(b) for b in self.model.buffers()})
            shared = frozenset([k for k, a in enumerate(args) if _is_state(a, state)]
                               + [k for k, a in kwargs.items() if _is_state(a, state)])
        step = self._step
        B = step.batch_size
        kind = _call_layout(t, args, kwargs, shared, B)
        if kind not in (batching.BATCH, batching.ROWS):
            self._sink_shared_call(t.module, step, args, kwargs, shared, out, kind)
            return
        split = None
        if kind == batching.ROWS:
            args, kwargs = _split(args, shared, B), _split(kwargs, shared, B)
            split = B
        outs = [flat[k] for k in index]
        call = Call(args, kwargs, [None] * len(outs), index, shared)
        step.calls.setdefault(id(t.module), []).append(call)
        step.pending[id(call)] = len(outs)
        for k, o in enumerate(outs):
            o.register_hook(lambda g, t=t, call=call, k=k: self._on_grad(
                step, t, call, k, g if split is None else batching.split_rows(g, split)))

    def _sink_shared_call(self, module: nn.Module, step: _Step, args, kwargs, shared: frozenset,
                    out, kind: str | None) -> None:
        """Record a call whose input has no batch: its output is shared by every
        sample, and its per-sample output gradient is gathered where it meets
        the batch (layers.broadcast). The rule then sees the call as B calls
        on the same input: a [1, …] input expanded to [B, …], another one
        stacked B times (rules that work row by row only)."""
        t, B = self._by_module[id(module)], step.batch_size
        if torch._C._current_graph_task_id() != -1:
            return          # re-run inside backward (activation checkpointing): not watched
        where = f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__})"
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(
                f"{where} was called on an input shared by every sample of the batch and returns "
                "several tensors; only a module with one tensor output can be measured per "
                "sample then. Leave it out with `layers=`, or call it on the batch.")
        x = next(a for k, a in (*enumerate(args), *kwargs.items())
                 if isinstance(a, torch.Tensor) and k not in shared)
        rows = x.shape[0]
        if (kind is None and x.requires_grad
                and (step.broadcast is None or not step.broadcast.is_shared(x))):
            raise RuntimeError(
                f"{where} was called on a tensor computed from the batch whose dim 0 ({rows}) is "
                f"not the batch ({B}, dim 0 of the model's input): the batch dimension differs "
                "between this module's input and the model's. Per-sample norms need every tracked "
                "module to see the samples along dim 0; move the batch to dim 0 (e.g. "
                "batch_first=True) or leave the module out with `layers=`.")
        if kind == batching.BROADCAST and out.dim() > 0 and out.shape[0] == 1:
            args, kwargs = _expanded(args, shared, B), _expanded(kwargs, shared, B)
            shape = out.shape[1:]
        elif t.rule.rowwise:
            args, kwargs = _stacked(args, shared, B), _stacked(kwargs, shared, B)
            shape = out.shape
        else:
            raise RuntimeError(
                f"{where} was called on an input of {rows} rows along dim 0 in a batch of {B} "
                "samples; per-sample norms need each call of this module to see the batch along "
                "dim 0, or an input shared by every sample with dim 0 of size 1. Leave the "
                "module out with `layers=`, or use the micro-batch noise source.")
        calls = step.calls.setdefault(id(module), [])
        if None in calls:     # the placeholder of a fused-backward module's call
            calls.remove(None)
        call = Call(args, kwargs, [None], [0], shared)
        calls.append(call)
        step.pending[id(call)] = 1
        if step.broadcast is None:
            step.broadcast = step.watch.need().broadcast = layers.broadcast.SharedContributions(B)
        step.broadcast.add_root(out, layers.broadcast.SharedRoot(
            t.name, out, B, lambda g: self._on_grad(step, t, call, 0, g.reshape(B, *shape))))

    def _sink_wants(self, module: nn.Module, x: torch.Tensor) -> _Step | None:
        """Called by a fused-backward module's forward: the step that measures
        this call, or None if it is not measured."""
        if not self._measuring():
            return None
        self._step.calls.setdefault(id(module), []).append(None)
        return self._step


def _call_layout(t: _Tracked, args, kwargs, shared: frozenset, B: int | None) -> str | None:
    """The batch layout (layers.batching) of a call's first per-sample tensor
    input; ROWS only for rules whose module works row by row."""
    inputs = [a for k, a in (*enumerate(args), *kwargs.items())
              if isinstance(a, torch.Tensor) and k not in shared]
    if not inputs:
        return batching.BATCH
    kind = batching.layout(inputs[0], B)
    if kind == batching.ROWS and not t.rule.rowwise:
        raise RuntimeError(
            f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) was called on the "
            f"batch of {B} samples reshaped into {inputs[0].shape[0]} rows; its rule cannot tell "
            "which rows belong to which sample. Call it on [B, …] input, or leave it out with "
            "`layers=`.")
    return kind


def _expanded(values, shared: frozenset, B: int):
    """Per-sample tensor inputs with dim 0 of size 1 expanded to B."""
    if isinstance(values, dict):
        return {k: v if k in shared else batching.expand_to(v, B) for k, v in values.items()}
    return tuple(v if k in shared else batching.expand_to(v, B) for k, v in enumerate(values))


def _stacked(values, shared: frozenset, B: int):
    """Per-sample tensor inputs stacked B times (a view)."""
    def stack(v):
        return v.unsqueeze(0).expand(B, *v.shape) if isinstance(v, torch.Tensor) else v
    if isinstance(values, dict):
        return {k: v if k in shared else stack(v) for k, v in values.items()}
    return tuple(v if k in shared else stack(v) for k, v in enumerate(values))


def _split(values, shared: frozenset, B: int):
    """Per-sample tensor inputs of B·k rows as [B, k, …]."""
    if isinstance(values, dict):
        return {k: v if k in shared else batching.split_rows(v, B) for k, v in values.items()}
    return tuple(v if k in shared else batching.split_rows(v, B) for k, v in enumerate(values))


def _warn_outside_uses_unchecked() -> None:
    warnings.warn(
        "GradNoiseTracker: the first measured step runs compiled by torch.compile, where the "
        "check that every measured parameter is used only inside the modules that measure it "
        "cannot see inside the compiled graphs; a use outside them (a parent calling "
        "F.linear(h, self.embed.weight), say) would leave its per-sample norms short. Run one "
        "training step uncompiled first (the check runs on the first measured step), or check "
        "the model with tracker.verify(...).", RuntimeWarning, stacklevel=2)


def _is_state(value, state_ids: set) -> bool:
    """Whether `value` is one of the model's parameters or buffers, or a view
    of one (a slice of a mask buffer, say). Under torch.compile it runs as
    Python, not traced: a traced id() of a tensor is guarded on, and each
    step's new activations would recompile it. (torch.compiler.disable is
    called here rather than as a decorator, so that importing gradnoise does
    not import torch._dynamo, which imports triton, whose interpreter must be
    chosen before that.)"""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_is_state_now)(value, state_ids)
    return _is_state_now(value, state_ids)


def _is_state_now(value, state_ids: set) -> bool:
    return isinstance(value, torch.Tensor) and (
        id(value) in state_ids or (value._base is not None and id(value._base) in state_ids))
