"""GradNoiseTracker's backward side: per-sample norms as each tracked call's
output gradient arrives or its fused backward runs, and at the end of
backward the calls kept for later (modules called several times, shared
parameters, uses summed before squaring) (docs/design.md §6)."""
from __future__ import annotations

import torch
from torch import nn

from .. import layers
from ..layers.calls import Call, batch_size_of
from .plan import _Tracked
from .step import _Step

# Memory allowed for one chunk of materialised per-sample gradients of a
# shared parameter (each use's and their sum are alive at once), or of the
# [b, T_u, T_v] products of its cross terms: small, so that a tied
# embedding adds little to the step's peak memory.
_SHARED_CHUNK_BYTES = 2 * 2**20
_UNMEASURABLE = (
    "GradNoiseTracker: the last backward ran with create_graph=True (a gradient penalty, "
    "Hessian-vector products), which is not measured: the norms would miss the gradient "
    "that flows through the differentiated graph. Gradients are unaffected. Pause the "
    "tracker (tracker.paused = True) around such passes, or read results after an "
    "ordinary backward.")


class _BackwardHooks:
    """The backward hooks and end-of-backward work of GradNoiseTracker (a
    mixin: the state is the tracker's)."""

    def _queue_finish(self, step: _Step) -> None:
        if not step.callback_queued:
            step.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._finish(step))

    def _backward_step(self, step: _Step | None) -> _Step | None:
        """The step a call's backward adds to: `step`, the one its forward
        recorded into; None if that step's backward has ended (a second
        backward through the same graph is not measured) or the tracker was
        detached or paused since. A backward that also reaches an earlier
        forward of the model than the last one cannot be measured: error."""
        if step is None or step.finished or self._step is None:
            return None
        if step is not self._step:
            raise RuntimeError(
                "GradNoiseTracker: this backward runs through two forward passes of the model "
                "(e.g. a loss made of model(a) and model(b)); a measurement covers one forward. "
                "Make them one call of a module that runs both (track that module), or measure "
                "the passes with separate backward calls.")
        return step

    def _enter_backward(self, step: _Step | None) -> _Step | None:
        """Every backward hook's first call: the step it measures (its
        end-of-backward work queued), or None. A backward with
        create_graph=True is not measured, and marks its step so."""
        step = self._backward_step(step)
        if step is None:
            return None
        self._queue_finish(step)
        if torch.is_grad_enabled():
            step.unmeasurable = _UNMEASURABLE
            return None
        return step

    def _on_grad(self, step: _Step, t: _Tracked, call: Call, k: int,
                 grad: torch.Tensor) -> None:
        step = self._enter_backward(step)
        if step is None:
            return
        call.grad_outputs[k] = grad
        step.pending[id(call)] -= 1
        if step.pending[id(call)] == 0 and self._is_simple(step, t):
            self._step_add(step, t, self._rule_call(t, "sq_norms", [call], t.own),
                           batch_size_of([call]))
            step.calls[id(t.module)].remove(call)
            call.release()

    def _sink_backward(self, module: nn.Module, step: _Step | None, x: torch.Tensor, weight,
                        saved: tuple, grad_out: torch.Tensor, need_input_grad: bool,
                        need_weight: bool, need_bias: bool):
        """Backward of a fused-backward module's call, measured by `step`:
        (grad_x, grad_weight, grad_bias)."""
        step = self._enter_backward(step)
        t = self._by_module[id(module)]
        if step is not None and len(step.calls.get(id(module), [])) == 1:
            gx, gw, gb, norms = t.rule.fused_backward(module, x, weight, saved, grad_out, t.own,
                                                      need_input_grad)
            self._add_own(step, t, norms, x, grad_out)
        else:
            # Called several times: the per-sample gradient sums over calls,
            # so keep (x, dY) until the end of backward.
            if step is not None:
                self._keep_call(step, t, x, grad_out)
            gx, gw, gb = t.rule.plain_backward(module, x, weight, saved, grad_out,
                                               need_input_grad, need_weight, need_bias)
        return ((gx if need_input_grad else None), (gw if need_weight else None),
                (gb if need_bias else None))

    def _sink_watch_output(self, module: nn.Module, step: _Step, x: torch.Tensor,
                     out: torch.Tensor) -> None:
        """Forward of a fused-backward module's call, measured by `step`, that
        keeps autograd's backward: its norms will come from the gradient of `out`."""
        t = self._by_module[id(module)]
        # The hook lives as long as the graph, so it holds x only until it
        # has used it: autograd's own reference goes after the layer's backward.
        held = [x]
        out.register_hook(lambda grad_out: self._output_grad(step, t, held, grad_out))

    def _output_grad(self, step: _Step, t: _Tracked, held: list, grad_out: torch.Tensor) -> None:
        """Its norms now or, if the module was called several times, at the
        end of backward over all its calls."""
        if not held:
            return
        x = held.pop()
        step = self._enter_backward(step)
        if step is None:
            return
        if len(step.calls.get(id(t.module), ())) == 1:
            self._add_own(step, t, t.rule.norms_from_output_grad(t.module, x, grad_out, t.own),
                          x, grad_out)
        else:
            self._keep_call(step, t, x, grad_out)

    def _sink_unmeasurable(self, step: _Step | None) -> None:
        """Told by a fused-backward module of a backward with create_graph=True."""
        self._enter_backward(step)

    @staticmethod
    def _keep_call(step: _Step, t: _Tracked, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Keep a call's (x, dY) for the end of backward."""
        step.calls[id(t.module)].append(Call((x,), {}, [grad_out]))

    def _add_own(self, step: _Step, t: _Tracked, norms: torch.Tensor, x: torch.Tensor,
                 grad_out: torch.Tensor) -> None:
        """A single call's norms: the module's, or for a shared weight its own
        term, the call being kept for the cross terms at the end of backward."""
        if t.tied:
            step.tied_own[id(t.module)] = norms
            factor = self._gathered_factor(step, t, x, grad_out)
            if factor is None:
                self._keep_call(step, t, x, grad_out)
            else:
                step.tied_factors[id(t.module)] = factor
        else:
            self._step_add(step, t, norms, x.shape[0])

    def _gathered_factor(self, step: _Step, t: _Tracked, x: torch.Tensor,
                         grad_out: torch.Tensor):
        """For a Linear use of a tied weight whose other uses are Embeddings
        called once this step (a tied LM head), its factor with dY gathered at
        their tokens now, so that dY itself is not kept; else None."""
        if t.rule.factor_kind != "dense":
            return None
        tokens = {}
        for u, _ in self._tied_params[t.param_ids[t.own[0]]]:
            if u is t:
                continue
            calls = [c for c in step.calls.get(id(u.module), []) if c is not None]
            if u.rule.factor_kind != "onehot" or len(calls) != 1:
                return None
            tokens[id(u.module)] = calls[0].args[0]
        return layers.tied.gathered_dense(x, grad_out, tokens) if tokens else None

    def _is_simple(self, step: _Step, t: _Tracked) -> bool:
        calls = step.calls.get(id(t.module), [])
        return not t.tied and len(calls) == 1

    # --------------------------------------------------------- end of backward
    def _finish(self, step: _Step) -> None:
        """Runs once at the end of each backward pass: deferred modules, shared
        parameters, batch-size check, loss-reduction scaling."""
        self._suspended = True
        try:
            if step.unmeasurable is not None:
                self._results, self._unmeasured = None, step.unmeasurable
                return
            for mid, calls in step.calls.items():
                calls = [c for c in calls if c is not None and any(
                    g is not None for g in c.grad_outputs)]
                if not calls:
                    continue
                t = self._by_module[mid]
                sizes = sorted({batch_size_of([c]) for c in calls})
                if len(sizes) > 1:
                    raise RuntimeError(
                        f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}) was "
                        f"called with inputs of {sizes} rows along dim 0 in one step; per-sample "
                        "norms need every call of a tracked module to see the batch along dim 0 "
                        "(leave the module out with `layers=` if some calls do not).")
                untied = [p for p in t.own if p not in t.tied]
                if untied:
                    self._step_add(step, t, self._rule_call(t, "sq_norms", calls, untied),
                                   sizes[0])
                step.batch.setdefault(t.name, sizes[0])
            for mid, uses in step.uses.items():
                left = [u for u in uses if not u.done and u.grad is not None]
                if left:
                    t = self._by_module[mid]
                    self._step_add(step, t, layers.functional.several_uses_sq_norms(
                        left, step.batch_size), step.batch_size)
            self._finish_tied(step)
            self._results, self._unmeasured = self._scaled(step), None
            self.steps_measured += 1
        finally:
            for calls in step.calls.values():
                for c in calls:
                    if c is not None:
                        c.release()
            self._suspended = False
            step.watch.leave()
            for h in step.param_hooks:
                h.remove()
            step.param_hooks.clear()
            step.uses.clear()
            step.calls.clear()
            step.pending.clear()
            step.tied_own.clear()
            step.tied_factors.clear()
            step.finished = True
            step.callback_queued = False
            step.sq_norms = {}

    @staticmethod
    def _rule_call(t: _Tracked, method: str, *args):
        """A rule's method on the module's recorded calls; an error of the
        torch.func fallback (which knows no names) is given the module's."""
        try:
            return getattr(t.rule, method)(t.module, *args)
        except (ValueError, RuntimeError) as e:
            if not isinstance(t.rule, layers.generic.GenericRule):
                raise
            raise type(e)(f"GradNoiseTracker: module '{t.name}' ({type(t.module).__name__}): "
                          f"{e}") from e

    def _step_add(self, step: _Step, t: _Tracked, norms, batch: int) -> None:
        """Add a rule's [B] result (or {child: [B]}) to the step's per-layer sums."""
        parts = norms if isinstance(norms, dict) else {"": norms}
        for child, n in parts.items():
            name = t.name if not child else (f"{t.name}.{child}" if t.name else child)
            step.batch[name] = batch
            if n.dtype != torch.float32:
                n = n.float()
            step.sq_norms[name] = n if name not in step.sq_norms else step.sq_norms[name] + n

    def _finish_tied(self, step: _Step) -> None:
        for pid, uses in self._tied_params.items():
            owner, _ = uses[0]
            recorded = []
            for t, pname in uses:
                calls = [c for c in step.calls.get(id(t.module), [])
                         if c is not None and any(g is not None for g in c.grad_outputs)]
                factor = step.tied_factors.pop(id(t.module), None)
                if calls or factor is not None:
                    recorded.append((t, pname, calls, factor))
            if not recorded:
                continue
            first = recorded[0]
            B = first[3].z.shape[0] if first[3] is not None else batch_size_of(first[2])
            if pid in self._factored:
                total = self._factored_sq_norms(step, recorded)
            else:
                total = self._materialised_sq_norms(owner.module.get_parameter(uses[0][1]),
                                                    recorded, B)
            self._step_add(step, owner, total, B)

    def _factored_sq_norms(self, step: _Step, recorded) -> torch.Tensor:
        """Σ_u ‖G_i^u‖² + 2 Σ_{u<v} ⟨G_i^u, G_i^v⟩ over the uses (layers.tied)."""
        factors, total = [], None
        for t, pname, calls, factor in recorded:
            own = step.tied_own.pop(id(t.module), None)
            if own is None:
                own = t.rule.sq_norms(t.module, calls, [pname])
            own = own.float() if own.dtype != torch.float64 else own
            total = own if total is None else total + own
            if factor is None:
                factor = t.rule.factor(t.module, calls, pname)
            factor.key = id(t.module)
            factors.append(factor)
        for k, u in enumerate(factors):
            for v in factors[k + 1:]:
                total = total + 2 * layers.tied.cross_sq_norms(u, v, _SHARED_CHUNK_BYTES)
        return total

    def _materialised_sq_norms(self, param: torch.Tensor, recorded, B: int) -> torch.Tensor:
        """‖Σ_u G_i^u‖² from per-sample gradients, in chunks of samples."""
        chunk = max(1, _SHARED_CHUNK_BYTES // max(1, 4 * param.numel()))
        total = torch.zeros(B, dtype=torch.float32, device=param.device)
        for start in range(0, B, chunk):
            sl = slice(start, min(B, start + chunk))
            acc = None
            for t, pname, calls, _ in recorded:
                g = self._rule_call(t, "per_sample_grads", calls, [pname], sl)[pname]
                acc = g if acc is None else acc + g
            total[sl] = acc.flatten(1).square().sum(1)
        return total
