"""The steps–examples front of fixed-batch runs, fitted.

McCandlish et al. 2018 (section 2.3, appendix D): at each batch size B the
best run reaches a target loss in S steps and E = B·S examples, and the
points follow the hyperbola

    (S/S_min − 1)(E/E_min − 1) = 1,   i.e.   S(B) = S_min (1 + B_crit/B),

with B_crit = E_min/S_min: below B_crit the steps halve when the batch
doubles, above it the examples double. `fit_front` fits log S(B) in log
space (each point counts by its relative error, whatever its size) with
scipy's least squares, and gives each figure a percentile bootstrap interval
over the points. `linear_scaling_limit` is Zhang et al. 2025's definition
of the critical batch, read from the points themselves without a model: the
batch at which the examples needed exceed the smallest batch's by 20%.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class FrontFit:
    """The fitted front of one target loss. Intervals are 95% percentile
    bootstrap intervals (None with fewer than three points)."""
    target: float
    s_min: float
    e_min: float
    b_crit: float
    s_min_interval: tuple[float, float] | None
    e_min_interval: tuple[float, float] | None
    b_crit_interval: tuple[float, float] | None
    batches: list[int]
    steps: list[float]
    residuals: list[float]          # log S measured − log S fitted, per point
    b_crit_zhang: float | None      # E(B)/E(B₀) = 1.2 (None: not reached in the grid)

    def pareto_product(self, steps: float, examples: float) -> float:
        """(S/S_min − 1)(E/E_min − 1) of a run that reached this target in
        `steps` steps and `examples` examples: 1 on the front, < 1 inside it."""
        return pareto_product(steps, examples, self.s_min, self.e_min)

    def to_dict(self) -> dict:
        return asdict(self)


def pareto_product(steps: float, examples: float, s_min: float, e_min: float) -> float:
    """(S/S_min − 1)(E/E_min − 1)."""
    return (steps / s_min - 1.0) * (examples / e_min - 1.0)


def _fit_log(batches: np.ndarray, steps: np.ndarray) -> tuple[float, float]:
    """(S_min, B_crit) minimising Σ (log S − log S_min − log(1 + B_crit/B))²."""
    try:
        from scipy.optimize import least_squares
    except ImportError:
        raise ImportError("gradnoise.critical_batch fits the front with scipy, which is not "
                          "installed: pip install -c constraints.txt -e '.[research]'") from None

    log_b, log_s = np.log(batches), np.log(steps)

    def residual(theta):
        log_smin, log_bcrit = theta
        return log_s - log_smin - np.logaddexp(0.0, log_bcrit - log_b)

    # Start from the two asymptotes: S_min below the largest batch's steps,
    # B_crit at the batch where S·B stops being flat.
    start = np.array([log_s.min() - 0.1, np.median(log_b)])
    sol = least_squares(residual, start, method="lm" if len(batches) > 2 else "trf")
    return math.exp(sol.x[0]), math.exp(sol.x[1])


def linear_scaling_limit(batches, steps, overhead: float = 0.2) -> float | None:
    """Zhang et al. 2025: the batch B at which E(B) = B·S(B) first exceeds
    (1 + overhead)·E(B₀), B₀ the smallest batch measured, with log-log
    interpolation between measured batches; None if no measured batch does."""
    order = np.argsort(batches)
    b = np.asarray(batches, float)[order]
    e = b * np.asarray(steps, float)[order]
    limit = (1.0 + overhead) * e[0]
    for i in range(1, len(b)):
        if e[i] > limit:
            # log E is taken as linear in log B between the two points
            t = (math.log(limit) - math.log(e[i - 1])) / (math.log(e[i]) - math.log(e[i - 1]))
            return float(math.exp(math.log(b[i - 1]) + t * (math.log(b[i]) - math.log(b[i - 1]))))
    return None


def fit_front(batches, steps, target: float = math.nan, bootstrap: int = 500,
              seed: int = 0) -> FrontFit:
    """Fit S(B) = S_min(1 + B_crit/B) to the best steps per batch at one target.

    batches, steps: one point per batch size (at least two, all > 0).
    bootstrap: resamples of the points (with replacement) for the intervals;
    a resample with fewer than two distinct batches is drawn again.
    """
    b = np.asarray(batches, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"fit_front: `batches` and `steps` must be two lists of one length, "
                         f"got {b.shape} and {s.shape}")
    if len(np.unique(b)) < 2:
        raise ValueError(f"fit_front: needs points at two batch sizes at least, got "
                         f"batches {b.tolist()}")
    if not (np.all(b > 0) and np.all(s > 0) and np.all(np.isfinite(s))):
        raise ValueError(f"fit_front: every batch and step count must be finite and > 0, got "
                         f"batches {b.tolist()}, steps {s.tolist()}")
    s_min, b_crit = _fit_log(b, s)
    fitted = np.log(s_min) + np.log1p(b_crit / b)
    intervals = [None, None, None]
    if bootstrap and len(b) >= 3:
        rng = np.random.default_rng(seed)
        draws = []
        while len(draws) < bootstrap:
            pick = rng.integers(0, len(b), len(b))
            if len(np.unique(b[pick])) < 2:
                continue
            sm, bc = _fit_log(b[pick], s[pick])
            draws.append((sm, sm * bc, bc))
        lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        intervals = [(float(lo[k]), float(hi[k])) for k in range(3)]
    return FrontFit(target=float(target), s_min=s_min, e_min=s_min * b_crit, b_crit=b_crit,
                    s_min_interval=intervals[0], e_min_interval=intervals[1],
                    b_crit_interval=intervals[2], batches=[int(x) for x in b],
                    steps=[float(x) for x in s],
                    residuals=[float(x) for x in np.log(s) - fitted],
                    b_crit_zhang=linear_scaling_limit(b, s))
