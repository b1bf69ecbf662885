"""GradientNoiseScale: the gradient noise scale of a model, measured step after
step from whichever small batch is at hand (estimators.py has the maths).

Sources (all give the same estimate on the same data):
  "per_sample"   b = 1, B = batch: per-sample norms from a GradNoiseTracker.
  "micro_batch"  b = micro-batch, B = accumulated batch: the gradient of
                 each backward of a gradient-accumulation step. Works for any
                 model (BatchNorm included) and needs no per-sample kernel.
  "distributed"  b = local batch, B = global batch, under
                 DistributedDataParallel: each rank's gradient before the
                 all-reduce against the all-reduced one. Only two scalars per
                 step cross the network.

    gns = GradientNoiseScale(model, source="micro_batch")
    for micro_batch in step_batches:
        (loss_fn(model(x), y) / len(step_batches)).backward()
    gns.step()                      # after the last backward, before zero_grad
    optimizer.step(); optimizer.zero_grad()
    gns.read().b_simple, gns.read().interval()

B_simple does not depend on how the loss was scaled (mean, sum, /k, a
GradScaler), since 𝒢 and 𝒮 scale alike; ‖G‖² and tr(Σ) are reported for a
loss that is the mean over samples (the GradScaler's scale undone).
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .estimators import NoiseScale, NoiseScaleEstimator, unbiased_sq_norm_and_trace
from .tracker import GradNoiseTracker

SOURCES = ("per_sample", "micro_batch", "distributed")


def _owner_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> qualified name of the first module that owns it."""
    owners = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), name)
    return owners


class GradientNoiseScale:
    """Measures B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018) during training.

    Args:
        model: the model being trained (the DDP-wrapped module for
            source="distributed").
        source: "per_sample", "micro_batch" or "distributed" (see module doc).
        beta: EMA factor of the smoothed estimates.
        per_layer: also keep one estimator per module that owns parameters.
        tracker: for "per_sample", an existing GradNoiseTracker to read
            (default: one is created with loss_reduction).
        loss_reduction: "mean" or "sum", how the loss combines samples
            (per_sample: passed to the tracker; all: for ‖G‖², tr(Σ) units).
        scaler: a torch.amp.GradScaler whose scale is undone.
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
    and before the gradients are zeroed or clipped. With the per-sample
    source and several backward passes per step (gradient accumulation),
    call `after_backward(loss_scale)` after each of them, loss_scale being
    the factor that multiplied that micro-batch's mean loss (e.g. 1/k).
    """

    def __init__(self, model: nn.Module, source: str = "per_sample", beta: float = 0.95,
                 per_layer: bool = False, tracker: GradNoiseTracker | None = None,
                 loss_reduction: str = "mean", scaler=None, process_group=None,
                 owns_tracker: bool | None = None, interval: int = 1):
        if source not in SOURCES:
            raise ValueError(f"GradientNoiseScale: `source` must be one of {SOURCES}, got {source!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"GradientNoiseScale: `loss_reduction` must be 'mean' or 'sum', "
                             f"got {loss_reduction!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"GradientNoiseScale: `interval` must be an integer ≥ 1 (measure one "
                             f"step in `interval`), got {interval!r}")
        if source == "distributed" and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GradientNoiseScale(source='distributed') needs an initialised "
                               "torch.distributed process group (init_process_group).")
        self.model = model
        self.source = source
        self.beta = beta
        self.loss_reduction = loss_reduction
        self.scaler = scaler
        self.group = process_group
        self.estimator = NoiseScaleEstimator(beta)
        self.per_layer = per_layer
        self.layer_estimators: dict[str, NoiseScaleEstimator] = {}
        self.skipped_steps = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._owners = _owner_names(model)
        self._handles = []
        self._own_seconds = 0.0
        self.interval = interval
        self.steps_seen = 0          # step() calls so far, measured or not
        self.tracker = None
        if source == "per_sample":
            self.tracker = tracker or GradNoiseTracker(model, loss_reduction=loss_reduction)
            self._owns_tracker = tracker is None if owns_tracker is None else owns_tracker
            self._ps_sums: dict[str, float] = {}          # layer -> Σ_i ‖∇ℓ_i‖² this step
            self._ps_count = 0
        else:
            self._micro: list[dict[str, float]] = []   # per backward: {layer: ‖g‖²}
            self._local: dict[str, float] = {}         # distributed: ‖local accumulated‖²
            self._current: dict[str, float] | None = None
            self._pending_local: dict[str, float] = {}
            for p in self.params:
                self._handles.append(p.register_hook(
                    lambda g, p=p: self._on_param_grad(p, g)))

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
        if self._current is None:
            self._current = {}
            self._micro.append(self._current)
            torch.autograd.Variable._execution_engine.queue_callback(self._close_backward)
        self._current[layer] = self._current.get(layer, 0.0) + g.detach().float().square().sum()
        if self.source == "distributed":
            # Before DDP's all-reduce: .grad holds this rank's earlier
            # micro-batches (no_sync), g is this backward's contribution.
            local = g.detach().float() if p.grad is None else p.grad.detach().float() + g.detach().float()
            self._pending_local[layer] = self._pending_local.get(layer, 0.0) + local.square().sum()

    def _close_backward(self) -> None:
        self._current = None
        if self.source == "distributed":
            # The last backward's value is the one that counts (it includes
            # every earlier micro-batch of this rank).
            self._local = dict(self._pending_local)
            self._pending_local.clear()

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
            g = p.grad.detach()
            grads.append(g.coalesce().values() if g.is_sparse else g)
        values = ops.sq_norms(grads).tolist()
        out: dict[str, float] = {}
        for p, v in zip(with_grad, values):
            layer = self._owners.get(id(p), "")
            out[layer] = out.get(layer, 0.0) + v
        return out

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

    def _scaler_on(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def _scale_sq(self) -> float:
        if self._scaler_on():
            s = float(self.scaler.get_scale())
            return s * s
        return 1.0

    def step(self, batch_size: int | None = None) -> NoiseScale | None:
        """Update the estimates from the step just completed and return the
        reading (None if the step is not one measured, see `interval`, or was
        skipped for non-finite gradients).

        batch_size: samples in this optimizer step on this process (needed
        for "micro_batch" and "distributed"; the per-sample source reads it).
        """
        start = time.perf_counter()
        measured = self.measuring
        try:
            return self._step(batch_size) if measured else None
        finally:
            self.steps_seen += 1
            self._pause_owned_tracker()
            self._own_seconds += time.perf_counter() - start

    def _step(self, batch_size: int | None) -> NoiseScale | None:
        if self.source == "per_sample":
            pairs = self._per_sample_pairs()
        elif self.source == "micro_batch":
            pairs = self._micro_batch_pairs(batch_size)
        else:
            pairs = self._distributed_pairs(batch_size)
        if pairs is None:
            return None
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

    def after_backward(self, loss_scale: float = 1.0) -> None:
        """Per-sample source: add this backward's per-sample norms. The
        tracker reports ‖c·∇ℓ_i‖² for a loss c·mean_i ℓ_i; c = loss_scale
        (including a GradScaler's scale, if any) is undone here."""
        if self.source != "per_sample" or not self.measuring:
            return  # the other sources see each backward through their hooks
        c2 = float(loss_scale) ** 2
        layers, sums, B = self.tracker.per_layer_sums()
        if not layers:
            return
        for layer, v in zip(layers, sums):
            self._ps_sums[layer] = self._ps_sums.get(layer, 0.0) + v / c2
        self._ps_count += B

    def _per_sample_pairs(self):
        if self._ps_count == 0:  # one backward in the step, nothing added yet
            self.after_backward(float(self.scaler.get_scale()) if self._scaler_on() else 1.0)
        sums, count = self._ps_sums, self._ps_count
        self._ps_sums, self._ps_count = {}, 0
        layers = list(sums)
        vec = [float(sums[n]) for n in layers] + [float(count)]
        world = self._distributed_world()
        if world > 1:
            summed = torch.tensor(vec, dtype=torch.float64)
            dist.all_reduce(summed, group=self.group)
            vec = summed.tolist()
        N = vec[-1]
        if N < 2:
            raise ValueError("GradientNoiseScale: the per-sample source needs at least 2 "
                             "samples in a step")
        grads = self._grad_sq_norms()
        scale = self._scale_sq()
        # ‖G_B‖² of the mean loss: DDP's averaged .grad of a sum loss is (N/R)·G_B
        batch_div = 1.0 if self.loss_reduction == "mean" else (N / world) ** 2
        pairs = {}
        for j, layer in enumerate(layers):
            small = vec[j] / N
            big = float(grads.get(layer, 0.0)) / scale / batch_div
            pairs[layer] = unbiased_sq_norm_and_trace(small, big, 1, N)
        return pairs

    def _micro_batch_pairs(self, batch_size):
        micro = self._micro
        self._micro = []
        self._current = None
        k = len(micro)
        if k < 2:
            raise ValueError(
                "GradientNoiseScale(source='micro_batch'): this step had "
                f"{k} backward pass(es); the estimate needs at least 2 micro-batches per "
                "optimizer step (gradient accumulation).")
        if batch_size is None:
            raise ValueError("GradientNoiseScale.step: pass batch_size (samples in the step)")
        b, B = batch_size / k, float(batch_size)
        grads = self._grad_sq_norms()
        # Each backward saw c·G_k (c = the user's loss scale, e.g. 1/k); the
        # accumulated gradient is c·k·G_B. Reported for c = 1/k.
        scale = self._scale_sq()
        pairs = {}
        for layer in grads:
            small = sum(m.get(layer, 0.0) for m in micro) / k * (k * k) / scale
            big = float(grads[layer]) / scale
            pairs[layer] = unbiased_sq_norm_and_trace(float(small), big, b, B)
        return pairs

    def _distributed_pairs(self, batch_size):
        if batch_size is None:
            raise ValueError("GradientNoiseScale.step: pass batch_size (samples in the step "
                             "on this rank)")
        local, self._local = self._local, {}
        self._micro, self._current = [], None
        grads = self._grad_sq_norms()
        layers = sorted(set(grads) | set(local), key=lambda n: n)
        world = dist.get_world_size(self.group)
        # one all-reduce: per layer ‖local‖²·(stuff) summed over ranks, and Σ 1/b_r
        vec = torch.tensor([float(local.get(n, 0.0)) for n in layers] + [1.0 / batch_size],
                           dtype=torch.float64)
        dist.all_reduce(vec, group=self.group)
        sum_inv_b = vec[-1].item()
        # E mean_r ‖G_{b_r}‖² = ‖G‖² + tr Σ · mean_r(1/b_r); the DDP average of
        # local means has E‖·‖² = ‖G‖² + tr Σ · Σ_r(1/b_r)/R².
        b_eff = world / sum_inv_b
        B_eff = world * world / sum_inv_b
        if world < 2:
            raise ValueError("GradientNoiseScale(source='distributed') needs at least 2 ranks")
        scale = self._scale_sq()
        pairs = {}
        for j, layer in enumerate(layers):
            small = vec[j].item() / world / scale
            big = float(grads.get(layer, 0.0)) / scale
            pairs[layer] = unbiased_sq_norm_and_trace(small, big, b_eff, B_eff)
        return pairs

    # ------------------------------------------------------------ reading
    def read(self) -> NoiseScale:
        return self.estimator.read()

    def read_layers(self) -> dict[str, NoiseScale]:
        return {k: v.read() for k, v in self.layer_estimators.items()}

    def state_dict(self) -> dict:
        return {"source": self.source, "beta": self.beta, "skipped_steps": self.skipped_steps,
                "interval": self.interval, "steps_seen": self.steps_seen,
                "estimator": self.estimator.state_dict(),
                "layers": {k: v.state_dict() for k, v in self.layer_estimators.items()}}

    def load_state_dict(self, state: dict) -> None:
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
