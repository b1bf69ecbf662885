"""gradnoise: per-sample gradient norms and the gradient noise scale, computed
in a fused pass during an ordinary training step.

See ``python -m gradnoise info`` for the kernels this installation can run.
"""
from . import _extension, ops
from .adaptive import (AdaptiveBatch, CriticalBatchPolicy, GoodputPolicy, SchedulePolicy,
                       probe_micro_batch, ramp_schedule)
from .estimators import NoiseScale, NoiseScaleEstimator
from .hessian import hessian_noise_scale
from .noise_scale import GradientNoiseScale
from .tracker import GradNoiseTracker

__version__ = "0.1.0"

_extension.load_all()

__all__ = ["AdaptiveBatch", "CriticalBatchPolicy", "GoodputPolicy", "SchedulePolicy",
           "probe_micro_batch", "ramp_schedule", "GradNoiseTracker", "GradientNoiseScale", "NoiseScale", "NoiseScaleEstimator",
           "hessian_noise_scale", "ops", "__version__"]
