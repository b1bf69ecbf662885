"""Which noise-scale source the adaptive batch reads (docs/design.md §8):
"auto" takes per-sample norms where the tracker measures every module by its
rules, the micro-batches of gradient accumulation where samples mix
(BatchNorm) or the tracker would need its slow fallback, and the replicas
under DistributedDataParallel."""
from __future__ import annotations

from ..noise_scale import GradientNoiseScale
from ..tracker import GradNoiseTracker
from ..model_structure import batchnorm_mixing
from .arguments import require_methods

NOISE_SOURCES = ("auto", "per_sample", "micro_batch", "distributed")


def choose_noise_source(controller, noise_source, beta, interval, loss_reduction="mean",
                        per_layer=False):
    """(object, name, reason) of the noise-scale source of `controller` (an
    AdaptiveBatch being built, or a trainer callback: its module, optimizer,
    scaler and processes)."""
    if not isinstance(noise_source, str):
        require_methods(noise_source, ("step", "read", "state_dict", "load_state_dict"),
                         f"`noise_source` must be one of {NOISE_SOURCES} or an object "
                         "with the GradientNoiseScale interface")
        return noise_source, getattr(noise_source, "source", "custom"), "given"
    if noise_source not in NOISE_SOURCES:
        raise ValueError(f"AdaptiveBatch: unknown `noise_source` {noise_source!r}; expected "
                         f"one of {NOISE_SOURCES}")
    name, reason, tracker = noise_source, "requested", None
    if noise_source == "auto":
        bn = [n for n, _ in batchnorm_mixing(controller.module)]
        if getattr(controller, "_sharded", None):
            # FSDP2 bypasses the gradient hooks of the other sources
            if bn:
                raise ValueError(
                    f"AdaptiveBatch: a model sharded by FSDP2 is measured from per-sample norms, "
                    f"which BatchNorm with batch statistics ({', '.join(bn[:3])}) forbids; use "
                    "GroupNorm/LayerNorm, or DistributedDataParallel with the 'distributed' "
                    "source")
            name, reason = "per_sample", "FSDP2 (fully_shard): per-sample norms over the ranks"
        elif controller._distributed:
            name, reason = "distributed", (f"DistributedDataParallel over {controller.world_size} "
                                           "processes: local against global gradients")
        elif bn:
            name, reason = "micro_batch", (f"BatchNorm with batch statistics ({', '.join(bn[:3])}) "
                                           "mixes samples: no per-sample gradients")
        else:
            # (planned first, attached only if chosen)
            try:
                tracker = GradNoiseTracker(controller.module, loss_reduction=loss_reduction,
                                           attach=False)
                if not tracker.fallback_modules:
                    tracker.attach()
            except (ValueError, RuntimeError) as e:
                tracker = None
                name, reason = "micro_batch", f"the per-sample tracker refused the model: {e}"
            else:
                if tracker.fallback_modules:
                    slow = ", ".join(repr(n) for n in tracker.fallback_modules[:4])
                    tracker = None
                    name, reason = "micro_batch", (
                        f"per-sample norms of {slow} would need the slow torch.func fallback")
                else:
                    name, reason = "per_sample", "per-sample gradient norms (GradNoiseTracker)"
    if name == "distributed" and not controller._distributed:
        raise ValueError("AdaptiveBatch: noise_source='distributed' needs a "
                         "DistributedDataParallel model over ≥ 2 processes")
    if name == "micro_batch" and controller._distributed:
        raise ValueError("AdaptiveBatch: noise_source='micro_batch' is not available with "
                         f"{controller.world_size} DDP processes; use 'distributed' (the default) "
                         "or 'per_sample'")
    if name == "per_sample":
        noise = GradientNoiseScale(controller.module, source="per_sample", beta=beta,
                                   tracker=tracker, scaler=controller.scaler,
                                   loss_reduction=loss_reduction, per_layer=per_layer,
                                   optimizer=controller.optimizer, process_group=controller._group,
                                   owns_tracker=True, interval=interval)
    else:
        noise = GradientNoiseScale(controller.module, source=name, beta=beta,
                                   scaler=controller.scaler, loss_reduction=loss_reduction,
                                   per_layer=per_layer,
                                   optimizer=controller.optimizer, process_group=controller._group,
                                   interval=interval)
    return noise, name, reason
