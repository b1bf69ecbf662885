"""The three sources of the small-batch gradients (see the package's
docstring): each records what the step's backward passes give it and turns
them, at the step, into the per-layer pairs (‖G‖², tr Σ) of
estimators.unbiased_sq_norm_and_trace."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..collectives import all_reduce
from ..estimators import effective_batch_size, weight_sums
from ..tracker import GradNoiseTracker
from .amp import grad_scales_sq
from .backwards import Backward, positive, two_batch_estimates, weights
from .gradients import sq_norm


def whole_model(per_layer: dict) -> dict:
    """{layer: ‖g‖²} summed into one entry "" for the whole model."""
    return {"": sum(float(v) for v in per_layer.values())}


class _Source:
    """What every source shares: the step's backward passes, the batch
    gradient's norms, the GradScaler, the process group. `gns` is the
    GradientNoiseScale that owns it (its settings and `measuring`)."""

    def __init__(self, gns):
        self.gns = gns
        self.backwards: list[Backward] = []   # this step's, in order

    def _weights(self, batch_size):
        return weights(self.backwards, batch_size, self.gns.loss_reduction)

    def _scales_sq(self):
        return grad_scales_sq(self.gns.scaler, self.gns.optimizer)

    def end_step(self) -> None:
        self.backwards = []

    def close(self) -> None:
        pass


class PerSampleSource(_Source):
    """b = 1, B = batch: per-sample norms from a GradNoiseTracker."""
    name = "per_sample"

    def __init__(self, gns, tracker: GradNoiseTracker, owns_tracker: bool):
        super().__init__(gns)
        self.tracker, self.owns_tracker = tracker, owns_tracker
        self.sums: dict[str, float] = {}   # layer -> Σ_i ‖∇ℓ_i‖² this step
        self.tracker_steps = tracker.steps_measured  # at the last after_backward/step

    def after_backward(self, c: float, batch_size) -> None:
        """Adds the backward's per-sample norms ‖∇ℓ_i‖² = (tracker's value)/c²."""
        self._check_one_new_backward("after_backward")
        layers, sums, B = self.tracker.per_layer_sums()
        if not layers:
            return
        if batch_size is not None and positive(batch_size, "after_backward: `batch_size`") != B:
            raise ValueError(f"GradientNoiseScale.after_backward: batch_size={batch_size} but "
                             f"the tracker measured {B} samples in this backward")
        for layer, v in zip(layers, sums):
            self.sums[layer] = self.sums.get(layer, 0.0) + v / (c * c)
        self.backwards.append(Backward(c, float(B)))

    def _check_one_new_backward(self, where: str) -> None:
        """The tracker's last backward is read: exactly one must have been
        measured since the previous after_backward or step."""
        new = self.tracker.steps_measured - self.tracker_steps
        self.tracker_steps = self.tracker.steps_measured
        if new > 1:
            raise ValueError(
                f"GradientNoiseScale.{where}: the tracker measured {new} backward passes since "
                "the last call; with several backward passes per step, call "
                "after_backward(loss_scale) after each of them")
        if new == 0:
            raise RuntimeError(f"GradientNoiseScale.{where}: the tracker measured no backward "
                               "pass since the last call")

    def pairs(self, batch_size):
        if not self.backwards:  # one backward in the step, not declared
            self.gns.after_backward(1.0)
        if not self.backwards:
            raise RuntimeError("GradientNoiseScale.step: the tracker measured no backward pass "
                               "this step")
        w, b = self._weights(batch_size)
        whole = self.gns.whole_model(self.sums)
        sums = whole_model(self.sums) if whole else self.sums
        self.sums = {}
        grads = self.gns.batch_sq_norms(whole)
        layers = list(sums)
        vec = [float(sums[n]) for n in layers] + [sum(b), *weight_sums(w, b)]
        world = self.gns._distributed_world()
        if world > 1:
            vec = all_reduce(vec, "sum", self.gns.group)
        N, W, W2 = vec[-3:]
        if N < 2:
            raise ValueError("GradientNoiseScale: the per-sample source needs at least 2 "
                             "samples in a step")
        s2, s2_grad = self._scales_sq()
        # .grad = (1/R) Σ w_j G_{b_j} (DDP averages over R ranks): G_big = .grad·R/W,
        # E‖G_big‖² = ‖G‖² + tr(Σ)/B_eff.
        big_factor, B_eff = (world / W) ** 2 / s2_grad, effective_batch_size(W, W2)
        return {layer: two_batch_estimates(vec[j] / N / s2,
                                           float(grads.get(layer, 0.0)) * big_factor, 1, B_eff)
                for j, layer in enumerate(layers)}

    def end_step(self) -> None:
        super().end_step()
        self.sums = {}
        self.tracker_steps = self.tracker.steps_measured

    def close(self) -> None:
        if self.owns_tracker:
            self.tracker.detach()


class _HookedSource(_Source):
    """A source that hooks every trainable parameter: the gradient of each
    backward pass, as backward produces it."""

    def __init__(self, gns):
        super().__init__(gns)
        # graph task of the backward the hooks are recording (None between)
        self.open_task: int | None = None
        self.handles = [p.register_hook(lambda g, p=p: self._on_param_grad(p, g))
                        for p in gns.params]

    def _on_param_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        start = time.perf_counter()
        try:
            if self.gns.measuring:
                self._add(p, g)
        finally:
            self.gns._own_seconds += time.perf_counter() - start

    def _add(self, p: torch.Tensor, g: torch.Tensor) -> None:
        layer = self.gns._owners.get(id(p), "")
        # A backward that raised never ran its end-of-backward callback: its
        # graph task is not this one.
        task = torch._C._current_graph_task_id()
        if task != self.open_task:
            self._new_backward()
            self.open_task = task
            self.backwards.append(Backward())
            torch.autograd.Variable._execution_engine.queue_callback(self._close_backward)
        self._add_grad(layer, p, g)

    def _close_backward(self) -> None:
        self.open_task = None

    def after_backward(self, c: float, batch_size) -> None:
        if not self.backwards or self.backwards[-1].loss_scale is not None:
            raise RuntimeError("GradientNoiseScale.after_backward: no backward pass of this model "
                               "since the last call; call it once after each backward")
        last = self.backwards[-1]
        last.loss_scale = c
        last.batch_size = None if batch_size is None else positive(
            batch_size, "after_backward: `batch_size`")

    def end_step(self) -> None:
        super().end_step()
        self.open_task = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class MicroBatchSource(_HookedSource):
    """b = micro-batch, B = accumulated batch: the gradient of each backward
    of a gradient-accumulation step."""
    name = "micro_batch"

    def _new_backward(self) -> None:
        if self.open_task is not None:
            self.backwards.pop()                      # the failed backward's

    def _add_grad(self, layer, p, g) -> None:
        norms = self.backwards[-1].sq_norms
        norms[layer] = norms.get(layer, 0.0) + sq_norm(g)

    def pairs(self, batch_size):
        k = len(self.backwards)
        if k < 2:
            raise ValueError(
                "GradientNoiseScale(source='micro_batch'): this step had "
                f"{k} backward pass(es); the estimate needs at least 2 micro-batches per "
                "optimizer step (gradient accumulation).")
        w, b = self._weights(batch_size)
        # every trainable parameter is hooked: a backward's layers are all of them
        whole = self.gns.whole_model(self.gns._trainable_layers)
        smalls = [whole_model(bk.sq_norms) if whole else bk.sq_norms for bk in self.backwards]
        grads = self.gns.batch_sq_norms(whole)
        s2, s2_grad = self._scales_sq()
        W, W2 = weight_sums(w, b)
        # small: mean_j ‖g_j / w_j‖² = mean_j ‖G_{b_j}‖², E = ‖G‖² + tr(Σ)·mean_j(1/b_j)
        b_small = k / sum(1.0 / y for y in b)
        pairs = {}
        for layer in grads:
            small = sum(float(norms.get(layer, 0.0)) / (wj * wj)
                        for norms, wj in zip(smalls, w)) / k / s2
            big = float(grads[layer]) / (W * W) / s2_grad
            pairs[layer] = two_batch_estimates(small, big, b_small,
                                               effective_batch_size(W, W2))
        return pairs


class DistributedSource(_HookedSource):
    """b = local batch, B = global batch under DistributedDataParallel: each
    rank's gradient before the all-reduce against the all-reduced one."""
    name = "distributed"

    def __init__(self, gns):
        super().__init__(gns)
        self.local: dict[str, float] = {}         # ‖local accumulated‖² per layer
        self.pending: dict[str, float] = {}

    def _new_backward(self) -> None:
        self.pending.clear()

    def _add_grad(self, layer, p, g) -> None:
        # Before DDP's all-reduce: .grad holds this rank's earlier
        # micro-batches (no_sync), g is this backward's contribution.
        local = g if p.grad is None else p.grad.detach() + g
        self.pending[layer] = self.pending.get(layer, 0.0) + sq_norm(local)

    def _close_backward(self) -> None:
        super()._close_backward()
        # The last backward's value is the one that counts (it includes
        # every earlier micro-batch of this rank).
        self.local = dict(self.pending)
        self.pending.clear()

    def pairs(self, batch_size):
        local, self.local = self.local, {}
        if not self.backwards:
            raise RuntimeError("GradientNoiseScale.step: no backward pass of the model since "
                               "the last step")
        w, b = self._weights(batch_size)
        whole = self.gns.whole_model(self.gns._trainable_layers)
        local = whole_model(local) if whole else local
        grads = self.gns.batch_sq_norms(whole)
        layers = sorted(set(grads) | set(local))
        world = dist.get_world_size(self.gns.group)
        if world < 2:
            raise ValueError("GradientNoiseScale(source='distributed') needs at least 2 ranks")
        s2, s2_grad = self._scales_sq()
        # This rank's accumulated gradient is Σ_j w_j G_{b_j} = W_r·(a batch
        # mean of effective size b_r); one all-reduce of ‖local/W_r‖² per
        # layer, Σ 1/b_r, Σ W_r and Σ w²/b.
        W_r, W2_r = weight_sums(w, b)
        b_r = effective_batch_size(W_r, W2_r)
        *smalls, sum_inv_b, W, W2 = all_reduce(
            [float(local.get(n, 0.0)) / (W_r * W_r) / s2 for n in layers] + [1.0 / b_r, W_r, W2_r],
            "sum", self.gns.group)
        b_small = world / sum_inv_b
        big_factor = (world / W) ** 2 / s2_grad
        return {layer: two_batch_estimates(smalls[j] / world,
                                           float(grads.get(layer, 0.0)) * big_factor,
                                           b_small, effective_batch_size(W, W2))
                for j, layer in enumerate(layers)}

    def end_step(self) -> None:
        super().end_step()
        self.pending.clear()

