"""gradnoise: per-sample gradient norms and the gradient noise scale, computed
in a fused pass during an ordinary training step.

See ``python -m gradnoise info`` for the kernels this installation can run.
"""
from . import _extension, ops
from .tracker import GradNoiseTracker

__version__ = "0.1.0"

_extension.load_all()

__all__ = ["GradNoiseTracker", "ops", "__version__"]
