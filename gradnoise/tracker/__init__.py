"""GradNoiseTracker, and the machinery behind it: planning (`plan`), the
forward hooks (`forward`), the backward hooks and end-of-backward work
(`backward`), the step's state (`step`) and reading results (`results`)."""
from .plan import counts_as_norm_layer
from .tracker import GradNoiseTracker

__all__ = ["GradNoiseTracker", "counts_as_norm_layer"]
