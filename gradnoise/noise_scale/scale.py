"""GradientNoiseScale: the estimator object of a training loop (the package's
docstring describes the sources)."""
from __future__ import annotations

import math
import time

import torch.distributed as dist
from torch import nn

from ..checks import is_int, is_real
from ..estimators import NoiseScale, NoiseScaleEstimator
from ..tracker import GradNoiseTracker
from .backwards import positive
from .gradients import GradSqNorms, owner_names, total_sq_norm
from .sources import DistributedSource, MicroBatchSource, PerSampleSource

SOURCES = ("per_sample", "micro_batch", "distributed")


def sharded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that FSDP2's fully_shard has sharded
    (instances of torch.distributed.fsdp.FSDPModule)."""
    if not dist.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp2_modules(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that FSDP2 has sharded ("" for the model itself)."""
    sharded = {id(m) for m in sharded_modules(model)}
    return [name for name, m in model.named_modules() if id(m) in sharded]


class GradientNoiseScale:
    """Measures B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018) during training.

    Args:
        model: the model being trained (the DDP-wrapped module for
            source="distributed"; the model itself once FSDP2's fully_shard
            has sharded it, built after fully_shard).
        source: "per_sample", "micro_batch" or "distributed" (see module doc).
            A model sharded by FSDP2 (torch.distributed.fsdp.fully_shard)
            takes "per_sample" only: the others read gradient hooks on the
            parameters, which FSDP2 bypasses, and are refused.
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
        process_group: for "distributed", and for "per_sample" under DDP
            or FSDP2, where the per-sample sums are all-reduced (default: the
            world). .grad is taken to be the mean over these ranks of their
            gradients, as DDP and FSDP2 reduce by default (not under FSDP2's
            set_gradient_divide_factor). Sharded gradients (DTensors) are
            summed over the whole world, which their device mesh must span.
        owns_tracker: detach the tracker on close() (default: if created here).
        interval: measure one optimizer step in `interval` (the first of each
            run of `interval` steps). The others cost nothing: a tracker this
            object owns is paused (the step runs untracked), the gradient
            hooks return at once and step() only counts. The averages advance
            once per measured step (beta per measurement), and the cost per
            step divides by `interval`.

    Call `step(batch_size)` once per optimizer step, after the last backward
    and before the gradients are zeroed or clipped, and before the
    GradScaler's `step` (after its `unscale_` is fine). Where the loop clips,
    pass the total norm `clip_grad_norm_` returned, `step(batch_size,
    grad_norm=total)`, after clipping: ‖G_B‖² is then that norm squared
    instead of a second read of every gradient (with per_layer, the layers'
    norms are still read, and scaled back to it).

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
        if source != "per_sample":
            sharded = [repr(n) if n else "the model" for n in fsdp2_modules(model)]
            if sharded:
                raise ValueError(
                    f"GradientNoiseScale(source={source!r}) cannot measure a model sharded by "
                    f"FSDP2's fully_shard ({', '.join(sharded[:3])}"
                    f"{' ...' if len(sharded) > 3 else ''}): FSDP2 runs forward and backward on "
                    "unsharded copies of the parameters and assigns the reduced, sharded "
                    "gradients to .grad itself, so the gradient hooks this source reads never see "
                    "the sharded parameters' gradients. Use source='per_sample' (per-sample norms "
                    "summed over the ranks, against the sharded batch gradient).")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"GradientNoiseScale: `loss_reduction` must be 'mean' or 'sum', "
                             f"got {loss_reduction!r}")
        if not is_real(beta) or not 0 <= beta < 1:
            raise ValueError(f"GradientNoiseScale: `beta` must be a number in [0, 1), got {beta!r}")
        if not is_int(interval) or interval < 1:
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
        self._owners = owner_names(model)
        self._trainable_layers = {self._owners.get(id(p), "") for p in self.params}
        self._own_seconds = 0.0
        self.interval = interval
        self.steps_seen = 0          # step() calls so far, measured or not
        self._given_sq_norm: float | None = None   # ‖G_B‖² passed to this step()
        self._grads = GradSqNorms(self.params, self._owners)
        if source == "per_sample":
            owns = tracker is None if owns_tracker is None else owns_tracker
            tracker = tracker or GradNoiseTracker(model, loss_reduction=loss_reduction)
            self._source = PerSampleSource(self, tracker, owns)
        elif source == "micro_batch":
            self._source = MicroBatchSource(self)
        else:
            self._source = DistributedSource(self)

    @property
    def tracker(self) -> GradNoiseTracker | None:
        """The GradNoiseTracker the per-sample source reads (None for the others)."""
        return getattr(self._source, "tracker", None)

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

    def after_backward(self, loss_scale: float = 1.0, batch_size: int | None = None) -> None:
        """Declare the backward pass just run: `loss_scale` is the factor c
        on its loss (c · mean or c · sum of its samples' losses, e.g. 1/k or
        b_j/N; not the GradScaler's scale, which is undone separately) and
        `batch_size` its number of samples (the per-sample source reads it
        from the tracker). With the per-sample source this also adds the
        backward's per-sample norms ‖∇ℓ_i‖² = (tracker's value)/c²."""
        if not self.measuring:
            return
        c = positive(loss_scale, "after_backward: `loss_scale`")
        self._source.after_backward(c, batch_size)

    # --------------------------------------------------------------- step
    def _distributed_world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    @property
    def measuring(self) -> bool:
        """Whether the current optimizer step is one that gets measured."""
        return self.steps_seen % self.interval == 0

    def _pause_owned_tracker(self) -> None:
        if self.tracker is not None and self._source.owns_tracker:
            self.tracker.paused = not self.measuring

    @property
    def overhead_seconds(self) -> float:
        """Seconds spent so far in this object's step() and in its gradient
        hooks: what measuring the noise scale has cost the training loop."""
        return self._own_seconds

    def step(self, batch_size: int | None = None, grad_norm=None) -> NoiseScale | None:
        """Update the estimates from the step just completed and return the
        reading (None if the step is not one measured, see `interval`, or was
        skipped for non-finite gradients; see `skipped_steps`).

        batch_size: samples in this optimizer step on this process (needed
        for "micro_batch" and "distributed" unless every backward declared
        its own with after_backward; the per-sample source reads it and
        checks it against the tracker's count).
        grad_norm: ‖G_B‖, the total norm of the step's batch gradient before
        clipping (what torch.nn.utils.clip_grad_norm_ returns; a number or a
        tensor), for the gradients as they are in .grad (unscaled after the
        GradScaler's unscale_).
        """
        start = time.perf_counter()
        measured = self.measuring
        try:
            if not measured:
                return None
            self._given_sq_norm = None if grad_norm is None else total_sq_norm(grad_norm)
            return self._step(batch_size)
        finally:
            self._given_sq_norm = None
            self._source.end_step()
            self.steps_seen += 1
            self._pause_owned_tracker()
            self._own_seconds += time.perf_counter() - start

    def discard_step(self) -> None:
        """End the current optimizer step without a reading: its backward
        passes are dropped (a step a loop knows cannot be measured, such as
        an epoch's last step of one micro-batch under the micro-batch
        source, or a step whose training_step skipped its backward)."""
        self._source.end_step()
        self.steps_seen += 1
        self._pause_owned_tracker()

    def _step(self, batch_size: int | None) -> NoiseScale | None:
        if batch_size is not None:
            batch_size = positive(batch_size, "step: `batch_size`")
        pairs = self._source.pairs(batch_size)
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

    def whole_model(self, small_layers) -> bool:
        """Whether this step's estimate is one pair for the whole model: the
        step was given the total norm, no per-layer estimates are kept, and
        the small batches cover every layer with trainable parameters. No
        gradient is read then."""
        return (self._given_sq_norm is not None and not self.per_layer
                and self._trainable_layers <= set(small_layers))

    def batch_sq_norms(self, whole: bool) -> dict[str, float]:
        """‖G_B‖² of the step's batch gradient: {"": value} for the whole
        model, else per layer (scaled back to the given total if any)."""
        if whole:
            return {"": self._given_sq_norm}
        return self._grads.batch(self._given_sq_norm)

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
        self._source.close()
