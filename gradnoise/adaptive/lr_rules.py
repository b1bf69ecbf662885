"""Learning-rate rules of the adaptive batch: the factor on the learning rate
at batch B against the initial batch B0 (docs/design.md §8), and its linear
warm-up after a batch change."""
from __future__ import annotations

import math

from ..estimators import NoiseScale

LR_RULES = ("none", "linear", "sqrt", "adascale", "mccandlish")
# Steps the smoothed estimate must have behind it before a policy or an LR
# rule acts on it: a bias-corrected EMA of fewer steps is mostly noise.
MIN_ESTIMATE_STEPS = 10


def usable_reading(reading: NoiseScale | None, min_steps: int = MIN_ESTIMATE_STEPS) -> bool:
    """A reading a decision may rest on: defined, positive, finite, and
    averaged over at least `min_steps` steps."""
    return (reading is not None and reading.b_simple is not None
            and reading.sq_norm is not None and reading.sq_norm > 0
            and math.isfinite(reading.b_simple) and reading.b_simple > 0
            and reading.steps >= min_steps)


def lr_factor(rule: str, batch: int, initial_batch: int, reading: NoiseScale | None,
              min_estimate_steps: int = MIN_ESTIMATE_STEPS) -> float | None:
    """The factor on the learning rate at batch B relative to B0 = initial_batch
    (s = B/B0), or None when the rule needs a noise estimate that is not
    usable yet.

        none        1
        linear      s                                      (Goyal et al. 2017)
        sqrt        sqrt(s)                                (Malladi et al. 2022)
        adascale    (tr Σ + ‖G‖²) / (tr Σ/s + ‖G‖²)        (Johnson et al. 2020)
        mccandlish  ε(B)/ε(B0) = (1 + φ/B0) / (1 + φ/B),  φ = B_simple,
                    from ε(B) = ε_max / (1 + B_noise/B)    (McCandlish et al. 2018)
    """
    s = batch / initial_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return s
    if rule == "sqrt":
        return math.sqrt(s)
    if rule not in ("adascale", "mccandlish"):
        raise ValueError(f"lr_factor: unknown rule {rule!r}; expected one of {LR_RULES}")
    if batch == initial_batch:
        return 1.0
    if not usable_reading(reading, min_estimate_steps):
        return None
    if rule == "adascale":
        trace, sq_norm = max(reading.trace, 0.0), reading.sq_norm
        return (trace + sq_norm) / (trace / s + sq_norm)
    phi = reading.b_simple
    return (1.0 + phi / initial_batch) / (1.0 + phi / batch)


class LRRamp:
    """Linear warm-up of the LR factor after a batch change: over the next
    `warmup_steps` optimizer steps the factor goes from the last factor used
    before the change to the rule's current value (which the adascale and
    mccandlish rules keep moving), reaching it at the last step."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.start: float | None = None
        self.done = 0

    @property
    def active(self) -> bool:
        return self.start is not None

    def begin(self, from_factor: float) -> None:
        if self.warmup_steps > 0:
            self.start, self.done = float(from_factor), 0

    def value(self, target: float) -> float:
        """The factor for the coming optimizer step (does not advance)."""
        if self.start is None:
            return target
        return self.start + (target - self.start) * (self.done + 1) / self.warmup_steps

    def advance(self) -> None:
        if self.start is not None:
            self.done += 1
            if self.done >= self.warmup_steps:
                self.start, self.done = None, 0

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "start": self.start, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps, self.start, self.done = (state["warmup_steps"], state["start"],
                                                    state["done"])


