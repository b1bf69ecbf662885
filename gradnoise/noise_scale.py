"""GradientNoiseScale: the gradient noise scale of a model, measured step after
step from whichever small batch is at hand (estimators.py has the maths).

Sources (all give the same estimate on the same data):
  "per_sample"   b = 1, B = batch: per-sample norms from a GradNoiseTracker.
  "micro_batch"  b = micro-batch, B = accumulated batch: the gradient of
                 each backward of a gradient-accumulation step. Works for any
                 model (BatchNorm included) and needs no per-sample kernel.
  "distributed"  b = local batch, B = global batch, under
                 DistributedDataParallel: each rank's gradient before the
                 all-reduce against the all-reduced one. Only a few scalars
                 per layer and step cross the network.

    gns = GradientNoiseScale(model, source="micro_batch")
    for x, y in step_batches:                       # k micro-batches
        (loss_fn(model(x), y) / k).backward()
    gns.step(batch_size)            # after the last backward, before zero_grad
    optimizer.step(); optimizer.zero_grad()
    gns.read().b_simple, gns.read().interval()

Micro-batches (and DDP shards) of unequal sizes, or losses weighted by
anything but 1/k, are declared with `after_backward(loss_scale, batch_size)`
after each backward; the estimates then use each backward's own batch size
and weight (estimators.effective_batch_size), so they stay unbiased.
B_simple does not depend on a loss scale common to every backward (mean or
sum, a constant factor, a GradScaler), since 𝒢 and 𝒮 scale alike; ‖G‖² and
tr(Σ) are reported for the mean loss over samples, the GradScaler's scale
undone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from numbers import Real

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .estimators import NoiseScale, NoiseScaleEstimator, effective_batch_size, weight_sums
from .estimators import unbiased_sq_norm_and_trace
from .tracker import GradNoiseTracker

SOURCES = ("per_sample", "micro_batch", "distributed")


def _two_batch_estimates(small, big, b, B):
    """estimators.unbiased_sq_norm_and_trace, with what to check when the
    declared weights make the accumulated batch no larger than the small one."""
    if not b < B:
        raise ValueError(
            f"GradientNoiseScale: the backward passes' weights and sizes give a small batch "
            f"b = {b:g} no smaller than the accumulated one B_eff = {B:g}; check the loss_scale "
            "and batch_size given to after_backward (weights far from proportional to the sizes "
            "leave no larger batch to compare with)")
    return unbiased_sq_norm_and_trace(small, big, b, B)


def _positive(value, what: str) -> float:
    """`value` as a float if it is a finite number > 0, else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"GradientNoiseScale.{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖², accumulated in float32 (float64 for float64 tensors)."""
    t = t.detach()
    if t.is_sparse:
        t = t.coalesce().values()
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=acc).square()


def _owner_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> qualified name of the first module that owns it."""
    owners = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), name)
    return owners


@dataclass
class _Backward:
    """One backward pass of the step being measured: the factor c on its
    loss (its mean over its samples, or their sum; a GradScaler's scale is
    not part of c), its number of samples b, and, for the micro-batch
    source, ‖g‖² of the gradient it produced, per layer."""
    loss_scale: float | None = None
    batch_size: float | None = None
    sq_norms: dict = field(default_factory=dict)


class GradientNoiseScale:
    """Measures B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018) during training.

    Args:
        model: the model being trained (the DDP-wrapped module for
            source="distributed").
        source: "per_sample", "micro_batch" or "distributed" (see module doc).
        beta: EMA factor of the smoothed estimates, in [0, 1).
        per_layer: also keep one estimator per module that owns parameters.
        tracker: for "per_sample", an existing GradNoiseTracker of this model
            to read (default: one is created with loss_reduction).
        loss_reduction: "mean" or "sum": whether each backward's loss is the
            mean or the sum of its samples' losses (times a constant, see
            `after_backward`).
        scaler: a torch.amp.GradScaler whose scale is undone.
        optimizer: the optimizer of this model's parameters, whose state in
            `scaler` says whether .grad is already unscaled. Without it, the
            scaler's state for any optimizer is taken to be this one's: pass
            it when the scaler serves several optimizers.
        process_group: for "distributed", and for "per_sample" under DDP,
            where the per-sample sums are all-reduced (default: the world).
        owns_tracker: detach the tracker on close() (default: if created here).
        interval: measure one optimizer step in `interval` (the first of each
            run of `interval` steps). The others cost nothing: a tracker this
            object owns is paused (the step runs untracked), the gradient
            hooks return at once and step() only counts. The averages advance
            once per measured step (beta per measurement), and the cost per
            step divides by `interval`.

    Call `step(batch_size)` once per optimizer step, after the last backward
    and before the gradients are zeroed or clipped, and before the
    GradScaler's `step` (after its `unscale_` is fine).

    Several backward passes per step (gradient accumulation): by default the
    step's `batch_size` samples are taken to be split evenly among them and
    each loss to be scaled by 1/k (k backward passes) for "mean", by 1 for
    "sum". Otherwise call `after_backward(loss_scale, batch_size)` after each
    backward with that backward's factor and samples (the per-sample source
    needs it whenever there are several backward passes).
    """

    def __init__(self, model: nn.Module, source: str = "per_sample", beta: float = 0.95,
                 per_layer: bool = False, tracker: GradNoiseTracker | None = None,
                 loss_reduction: str = "mean", scaler=None, process_group=None,
                 owns_tracker: bool | None = None, interval: int = 1, optimizer=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientNoiseScale: `model` must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if source not in SOURCES:
            raise ValueError(f"GradientNoiseScale: `source` must be one of {SOURCES}, got {source!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"GradientNoiseScale: `loss_reduction` must be 'mean' or 'sum', "
                             f"got {loss_reduction!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"GradientNoiseScale: `beta` must be a number in [0, 1), got {beta!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"GradientNoiseScale: `interval` must be an integer ≥ 1 (measure one "
                             f"step in `interval`), got {interval!r}")
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "is_enabled")):
            raise TypeError(f"GradientNoiseScale: `scaler` must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        if source == "distributed" and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GradientNoiseScale(source='distributed') needs an initialised "
                               "torch.distributed process group (init_process_group).")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("GradientNoiseScale: `model` has no trainable parameters "
                             "(requires_grad=True); there is no gradient to measure")
        if tracker is not None:
            self._check_tracker(tracker, source, loss_reduction)
        self.source = source
        self.beta = float(beta)
        self.loss_reduction = loss_reduction
        self.scaler = scaler
        self.optimizer = optimizer
        self.group = process_group
        self.estimator = NoiseScaleEstimator(self.beta)
        self.per_layer = per_layer
        self.layer_estimators: dict[str, NoiseScaleEstimator] = {}
        self.skipped_steps = 0
        self._owners = _owner_names(model)
        self._handles = []
        self._own_seconds = 0.0
        self.interval = interval
        self.steps_seen = 0          # step() calls so far, measured or not
        self._backwards: list[_Backward] = []   # this step's, in order
        self._grad_devices: set | None = None
        self.tracker = None
        if source == "per_sample":
            self.tracker = tracker or GradNoiseTracker(model, loss_reduction=loss_reduction)
            self._owns_tracker = tracker is None if owns_tracker is None else owns_tracker
            self._ps_sums: dict[str, float] = {}   # layer -> Σ_i ‖∇ℓ_i‖² this step
            self._tracker_steps = self.tracker.steps_measured  # at the last after_backward/step
        else:
            self._local: dict[str, float] = {}         # distributed: ‖local accumulated‖²
            # graph task of the backward the hooks are recording (None between)
            self._open_task: int | None = None
            self._pending_local: dict[str, float] = {}
            for p in self.params:
                self._handles.append(p.register_hook(
                    lambda g, p=p: self._on_param_grad(p, g)))

    def _check_tracker(self, tracker, source: str, loss_reduction: str) -> None:
        if source != "per_sample":
            raise ValueError(f"GradientNoiseScale: `tracker` is read by the per-sample source "
                             f"only; source={source!r} measures without one")
        if not isinstance(tracker, GradNoiseTracker):
            raise TypeError(f"GradientNoiseScale: `tracker` must be a GradNoiseTracker, got "
                            f"{type(tracker).__name__}")
        if {id(p) for p in tracker.model.parameters() if p.requires_grad} != {
                id(p) for p in self.params}:
            raise ValueError("GradientNoiseScale: `tracker` measures another model than `model`")
        if tracker.loss_reduction != loss_reduction:
            raise ValueError(
                f"GradientNoiseScale: the tracker's loss_reduction is "
                f"{tracker.loss_reduction!r} but `loss_reduction` is {loss_reduction!r}; "
                "pass the same value to both")

    # ------------------------------------------------------------ capture
    def _on_param_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        start = time.perf_counter()
        try:
            self._add_backward_grad(p, g)
        finally:
            self._own_seconds += time.perf_counter() - start

    def _add_backward_grad(self, p: torch.Tensor, g: torch.Tensor) -> None:
        if not self.measuring:
            return
        layer = self._owners.get(id(p), "")
        # A backward that raised never ran its end-of-backward callback: its
        # graph task is not this one.
        task = torch._C._current_graph_task_id()
        if task != self._open_task:
            if self._open_task is not None and self.source == "micro_batch":
                self._backwards.pop()                      # the failed backward's
            self._open_task = task
            self._pending_local.clear()
            self._backwards.append(_Backward())
            torch.autograd.Variable._execution_engine.queue_callback(self._close_backward)
        if self.source == "micro_batch":
            norms = self._backwards[-1].sq_norms
            norms[layer] = norms.get(layer, 0.0) + _sq_norm(g)
        else:
            # Before DDP's all-reduce: .grad holds this rank's earlier
            # micro-batches (no_sync), g is this backward's contribution.
            local = g if p.grad is None else p.grad.detach() + g
            self._pending_local[layer] = self._pending_local.get(layer, 0.0) + _sq_norm(local)

    def _close_backward(self) -> None:
        self._open_task = None
        if self.source == "distributed":
            # The last backward's value is the one that counts (it includes
            # every earlier micro-batch of this rank).
            self._local = dict(self._pending_local)
            self._pending_local.clear()

    def after_backward(self, loss_scale: float = 1.0, batch_size: int | None = None) -> None:
        """Declare the backward pass just run: `loss_scale` is the factor c
        on its loss (c · mean or c · sum of its samples' losses, e.g. 1/k or
        b_j/N; not the GradScaler's scale, which is undone separately) and
        `batch_size` its number of samples (the per-sample source reads it
        from the tracker). With the per-sample source this also adds the
        backward's per-sample norms ‖∇ℓ_i‖² = (tracker's value)/c²."""
        if not self.measuring:
            return
        c = _positive(loss_scale, "after_backward: `loss_scale`")
        if self.source == "per_sample":
            self._check_one_new_backward("after_backward")
            layers, sums, B = self.tracker.per_layer_sums()
            if not layers:
                return
            if batch_size is not None and _positive(batch_size, "after_backward: `batch_size`") != B:
                raise ValueError(f"GradientNoiseScale.after_backward: batch_size={batch_size} but "
                                 f"the tracker measured {B} samples in this backward")
            for layer, v in zip(layers, sums):
                self._ps_sums[layer] = self._ps_sums.get(layer, 0.0) + v / (c * c)
            self._backwards.append(_Backward(c, float(B)))
            return
        if not self._backwards or self._backwards[-1].loss_scale is not None:
            raise RuntimeError("GradientNoiseScale.after_backward: no backward pass of this model "
                               "since the last call; call it once after each backward")
        last = self._backwards[-1]
        last.loss_scale = c
        last.batch_size = None if batch_size is None else _positive(
            batch_size, "after_backward: `batch_size`")

    # --------------------------------------------------------------- step
    def _grad_sq_norms(self) -> dict[str, float]:
        """{layer: ‖.grad‖²} over the parameters each layer owns. Reading every
        gradient is the estimator's main cost: one call of ops.sq_norms
        streams them all with every core, and one host copy brings the
        results back."""
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return {}
        grads = []
        for p in with_grad:
            g = p.grad
            if g.is_sparse:
                g = g.coalesce().values()
            elif g.requires_grad:  # (after create_graph=True; an op per gradient otherwise)
                g = g.detach()
            grads.append(g)
        # gradients of one model's parameters: checked once, the first time
        # (a model spread over devices takes the checked path every step)
        devices = self._grad_devices
        if devices is None:
            devices = self._grad_devices = {p.grad.device for p in with_grad}
        values = (ops.reductions.sq_norms_unchecked(grads) if len(devices) == 1
                  else ops.sq_norms(grads)).tolist()
        out: dict[str, float] = {}
        for p, v in zip(with_grad, values):
            layer = self._owners.get(id(p), "")
            out[layer] = out.get(layer, 0.0) + v
        return out

    def _batch_grad_sq_norms(self) -> dict[str, float]:
        grads = self._grad_sq_norms()
        if not grads:
            raise RuntimeError(
                "GradientNoiseScale.step: no parameter of the model has a gradient. Call step() "
                "after the step's last backward and before optimizer.zero_grad().")
        return grads

    def _distributed_world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    @property
    def measuring(self) -> bool:
        """Whether the current optimizer step is one that gets measured."""
        return self.steps_seen % self.interval == 0

    def _pause_owned_tracker(self) -> None:
        if self.tracker is not None and self._owns_tracker:
            self.tracker.paused = not self.measuring

    @property
    def overhead_seconds(self) -> float:
        """Seconds spent so far in this object's step() and in its gradient
        hooks: what measuring the noise scale has cost the training loop."""
        return self._own_seconds

    def _scales_sq(self) -> tuple[float, float]:
        """(s², s²_grad): the GradScaler's scale squared, which multiplies every
        gradient captured during backward, and the factor still on .grad
        (1 once the scaler has unscaled the gradients)."""
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0, 1.0
        states = getattr(self.scaler, "_per_optimizer_states", {})
        if self.optimizer is not None:
            stages = {getattr(states[id(self.optimizer)].get("stage"), "name", "READY")
                      if id(self.optimizer) in states else "READY"}
        else:
            stages = {getattr(st.get("stage"), "name", "READY") for st in states.values()}
            if len(stages) > 1:
                raise RuntimeError(
                    "GradientNoiseScale.step: the GradScaler serves several optimizers, in "
                    "different stages; pass GradientNoiseScale(..., optimizer=...) so that it "
                    "knows whether this model's gradients are unscaled yet")
        if "STEPPED" in stages:
            raise RuntimeError(
                "GradientNoiseScale.step: the GradScaler has already stepped the optimizer "
                "this iteration; call gns.step() before scaler.step(optimizer) (after "
                "scaler.unscale_(optimizer) is fine)")
        s2 = float(self.scaler.get_scale()) ** 2
        return s2, (1.0 if "UNSCALED" in stages else s2)

    def step(self, batch_size: int | None = None) -> NoiseScale | None:
        """Update the estimates from the step just completed and return the
        reading (None if the step is not one measured, see `interval`, or was
        skipped for non-finite gradients; see `skipped_steps`).

        batch_size: samples in this optimizer step on this process (needed
        for "micro_batch" and "distributed" unless every backward declared
        its own with after_backward; the per-sample source reads it and
        checks it against the tracker's count).
        """
        start = time.perf_counter()
        measured = self.measuring
        try:
            return self._step(batch_size) if measured else None
        finally:
            self._backwards = []
            if self.source == "per_sample":
                self._ps_sums = {}
                self._tracker_steps = self.tracker.steps_measured
            else:
                self._open_task = None
                self._pending_local.clear()
            self.steps_seen += 1
            self._pause_owned_tracker()
            self._own_seconds += time.perf_counter() - start

    def _step(self, batch_size: int | None) -> NoiseScale | None:
        if batch_size is not None:
            batch_size = _positive(batch_size, "step: `batch_size`")
        if self.source == "per_sample":
            pairs = self._per_sample_pairs(batch_size)
        elif self.source == "micro_batch":
            pairs = self._micro_batch_pairs(batch_size)
        else:
            pairs = self._distributed_pairs(batch_size)
        finite = all(math.isfinite(g) and math.isfinite(s) for g, s in pairs.values())
        if not finite:
            self.skipped_steps += 1
            return None
        total_g = sum(g for g, _ in pairs.values())
        total_s = sum(s for _, s in pairs.values())
        self.estimator.update(total_g, total_s)
        if self.per_layer:
            for layer, (g, s) in pairs.items():
                self.layer_estimators.setdefault(layer, NoiseScaleEstimator(self.beta)).update(g, s)
        return self.read()

    def _weights(self, batch_size: float | None) -> tuple[list[float], list[float]]:
        """(w_j, b_j) of this step's backward passes on this process: b_j its
        samples and w_j the factor on its mean gradient G_{b_j} in what it
        added to .grad (c_j for a mean loss, c_j·b_j for a sum)."""
        backs = self._backwards
        k = len(backs)
        declared = [bk.batch_size is not None for bk in backs]
        if all(declared):
            sizes = [bk.batch_size for bk in backs]
            if batch_size is not None and abs(sum(sizes) - batch_size) > 1e-9 * batch_size:
                raise ValueError(
                    f"GradientNoiseScale.step: batch_size={batch_size:g} but the backward "
                    f"passes declared {sum(sizes):g} samples ({', '.join(f'{b:g}' for b in sizes)})")
        elif any(declared):
            raise ValueError("GradientNoiseScale: after_backward gave batch_size for some "
                             "backward passes of this step and not for others")
        else:
            if batch_size is None:
                raise ValueError("GradientNoiseScale.step: pass batch_size (samples in this "
                                 "optimizer step on this process)")
            if k > 1 and batch_size % k:
                raise ValueError(
                    f"GradientNoiseScale.step: batch_size={batch_size:g} does not split evenly "
                    f"into the step's {k} backward passes; call after_backward(loss_scale, "
                    "batch_size) after each backward to give each one's samples")
            sizes = [batch_size / k] * k
        default_c = 1.0 / k if self.loss_reduction == "mean" else 1.0
        scales = [default_c if bk.loss_scale is None else bk.loss_scale for bk in backs]
        if self.loss_reduction == "sum":
            return [c * b for c, b in zip(scales, sizes)], sizes
        return scales, sizes

    def _check_one_new_backward(self, where: str) -> None:
        """The per-sample source reads the tracker's last backward: exactly one
        must have been measured since the previous after_backward or step."""
        new = self.tracker.steps_measured - self._tracker_steps
        self._tracker_steps = self.tracker.steps_measured
        if new > 1:
            raise ValueError(
                f"GradientNoiseScale.{where}: the tracker measured {new} backward passes since "
                "the last call; with several backward passes per step, call "
                "after_backward(loss_scale) after each of them")
        if new == 0:
            raise RuntimeError(f"GradientNoiseScale.{where}: the tracker measured no backward "
                               "pass since the last call")

    def _per_sample_pairs(self, batch_size):
        if not self._backwards:  # one backward in the step, not declared
            self.after_backward(1.0)
        if not self._backwards:
            raise RuntimeError("GradientNoiseScale.step: the tracker measured no backward pass "
                               "this step")
        w, b = self._weights(batch_size)
        sums, self._ps_sums = self._ps_sums, {}
        layers = list(sums)
        vec = [float(sums[n]) for n in layers] + [sum(b), *weight_sums(w, b)]
        world = self._distributed_world()
        if world > 1:
            summed = torch.tensor(vec, dtype=torch.float64)
            dist.all_reduce(summed, group=self.group)
            vec = summed.tolist()
        N, W, W2 = vec[-3:]
        if N < 2:
            raise ValueError("GradientNoiseScale: the per-sample source needs at least 2 "
                             "samples in a step")
        grads = self._batch_grad_sq_norms()
        s2, s2_grad = self._scales_sq()
        # .grad = (1/R) Σ w_j G_{b_j} (DDP averages over R ranks): G_big = .grad·R/W,
        # E‖G_big‖² = ‖G‖² + tr(Σ)/B_eff.
        big_factor, B_eff = (world / W) ** 2 / s2_grad, effective_batch_size(W, W2)
        return {layer: _two_batch_estimates(vec[j] / N / s2,
                                            float(grads.get(layer, 0.0)) * big_factor, 1, B_eff)
                for j, layer in enumerate(layers)}

    def _micro_batch_pairs(self, batch_size):
        k = len(self._backwards)
        if k < 2:
            raise ValueError(
                "GradientNoiseScale(source='micro_batch'): this step had "
                f"{k} backward pass(es); the estimate needs at least 2 micro-batches per "
                "optimizer step (gradient accumulation).")
        w, b = self._weights(batch_size)
        grads = self._batch_grad_sq_norms()
        s2, s2_grad = self._scales_sq()
        W, W2 = weight_sums(w, b)
        # small: mean_j ‖g_j / w_j‖² = mean_j ‖G_{b_j}‖², E = ‖G‖² + tr(Σ)·mean_j(1/b_j)
        b_small = k / sum(1.0 / y for y in b)
        pairs = {}
        for layer in grads:
            small = sum(float(bk.sq_norms.get(layer, 0.0)) / (wj * wj)
                        for bk, wj in zip(self._backwards, w)) / k / s2
            big = float(grads[layer]) / (W * W) / s2_grad
            pairs[layer] = _two_batch_estimates(small, big, b_small,
                                                effective_batch_size(W, W2))
        return pairs

    def _distributed_pairs(self, batch_size):
        local, self._local = self._local, {}
        if not self._backwards:
            raise RuntimeError("GradientNoiseScale.step: no backward pass of the model since "
                               "the last step")
        w, b = self._weights(batch_size)
        grads = self._batch_grad_sq_norms()
        layers = sorted(set(grads) | set(local))
        world = dist.get_world_size(self.group)
        if world < 2:
            raise ValueError("GradientNoiseScale(source='distributed') needs at least 2 ranks")
        s2, s2_grad = self._scales_sq()
        # This rank's accumulated gradient is Σ_j w_j G_{b_j} = W_r·(a batch
        # mean of effective size b_r); one all-reduce of ‖local/W_r‖² per
        # layer, Σ 1/b_r, Σ W_r and Σ w²/b.
        W_r, W2_r = weight_sums(w, b)
        b_r = effective_batch_size(W_r, W2_r)
        vec = torch.tensor([float(local.get(n, 0.0)) / (W_r * W_r) / s2 for n in layers]
                           + [1.0 / b_r, W_r, W2_r], dtype=torch.float64)
        dist.all_reduce(vec, group=self.group)
        *smalls, sum_inv_b, W, W2 = vec.tolist()
        b_small = world / sum_inv_b
        big_factor = (world / W) ** 2 / s2_grad
        return {layer: _two_batch_estimates(smalls[j] / world,
                                            float(grads.get(layer, 0.0)) * big_factor,
                                            b_small, effective_batch_size(W, W2))
                for j, layer in enumerate(layers)}

    # ------------------------------------------------------------ reading
    def read(self) -> NoiseScale:
        """The smoothed estimates, with the count of skipped (non-finite) steps."""
        reading = self.estimator.read()
        reading.skipped_steps = self.skipped_steps
        return reading

    def read_layers(self) -> dict[str, NoiseScale]:
        return {k: v.read() for k, v in self.layer_estimators.items()}

    def state_dict(self) -> dict:
        return {"source": self.source, "beta": self.beta, "skipped_steps": self.skipped_steps,
                "interval": self.interval, "steps_seen": self.steps_seen,
                "estimator": self.estimator.state_dict(),
                "layers": {k: v.state_dict() for k, v in self.layer_estimators.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("source", "beta", "skipped_steps", "estimator", "layers")
                   if k not in state]
        if missing:
            raise ValueError(f"GradientNoiseScale.load_state_dict: not a state of "
                             f"GradientNoiseScale.state_dict() (missing {missing})")
        if state["source"] != self.source:
            raise ValueError(f"GradientNoiseScale.load_state_dict: state is from source "
                             f"{state['source']!r}, this object measures {self.source!r}")
        self.beta, self.skipped_steps = state["beta"], state["skipped_steps"]
        self.interval = state.get("interval", self.interval)
        self.steps_seen = state.get("steps_seen", 0)
        self._pause_owned_tracker()
        self.estimator.load_state_dict(state["estimator"])
        self.layer_estimators = {}
        for k, v in state["layers"].items():
            est = NoiseScaleEstimator(self.beta)
            est.load_state_dict(v)
            self.layer_estimators[k] = est

    def close(self) -> None:
        """Remove the hooks (and detach the tracker if this object owns it)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.tracker is not None and self._owns_tracker:
            self.tracker.detach()
