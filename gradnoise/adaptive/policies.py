"""Batch-size policies: the batch for the next steps, from the noise scale
("critical", "goodput") or a given ramp ("schedule"), within the limits that
memory and the data allow (docs/design.md §8)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import is_real
from ..estimators import NoiseScale
from .lr_rules import MIN_ESTIMATE_STEPS, usable_reading

POLICIES = ("critical", "goodput", "schedule")
#: one-sided 95%: a policy grows the batch only when B_simple's lower bound
#: asks for it (and shrinks it only on its upper bound). Early estimates are
#: wide and biased upwards (estimators.py): acting on the point estimate took
#: the built-in task from 24 to 72 on B_simple = 73 ± 126.
CONFIDENCE_Z = 1.645


@dataclass
class BatchLimits:
    """Valid batch sizes and how a policy's wish becomes a change.

    Valid sizes are the multiples of `unit` = micro_batch × world_size in
    [min_batch, max_batch]. `accept` applies grow-only and hysteresis: the
    batch moves to the wanted size only if it is at least (1 + hysteresis)
    times the current one (at most current/(1 + hysteresis) when shrinking is
    allowed), or if the wish lies at or beyond a bound (then the bound is
    taken, since a batch one step short of max_batch would otherwise wait
    forever for a wish it cannot reach).
    """
    min_batch: int
    max_batch: int
    unit: int
    initial_batch: int
    grow_only: bool = True
    hysteresis: float = 0.25
    min_estimate_steps: int = MIN_ESTIMATE_STEPS
    confidence: float = CONFIDENCE_Z

    def bounds(self, reading: NoiseScale) -> tuple[float, float]:
        """(lower, upper) bound of B_simple: b ∓ z·stderr with z = confidence;
        the point estimate for both when the reading has no standard error."""
        spread = 0.0 if reading.stderr is None else self.confidence * reading.stderr
        return reading.b_simple - spread, reading.b_simple + spread

    def round(self, batch: float) -> int:
        """The nearest valid batch size (halves round up), clamped to the bounds."""
        k = math.floor(batch / self.unit + 0.5)
        return int(min(max(k * self.unit, self.min_batch), self.max_batch))

    def accept(self, current: int, wanted: float) -> int:
        """The next batch size given the policy's (unrounded) wish."""
        if not math.isfinite(wanted):
            return current
        target = self.round(wanted)
        h = 1.0 + self.hysteresis
        if target > current and (wanted >= h * current or wanted >= self.max_batch):
            return target
        if (not self.grow_only and target < current
                and (wanted <= current / h or wanted <= self.min_batch)):
            return target
        return current


class CriticalBatchPolicy:
    """Follow the critical batch: wish = critical_factor · B_simple (the
    smoothed estimate; McCandlish et al. 2018), applied through
    `BatchLimits.accept` (bounds, grow-only, hysteresis) once the estimate has
    `min_estimate_steps` steps behind it. The batch grows only as far as the
    lower confidence bound of B_simple asks, and shrinks only as far as its
    upper bound allows (`BatchLimits.bounds`)."""
    name = "critical"

    def __init__(self, critical_factor: float = 1.0):
        if not (is_real(critical_factor) and critical_factor > 0):
            raise ValueError(f"AdaptiveBatch: `critical_factor` must be a positive number, "
                             f"got {critical_factor!r}")
        self.critical_factor = float(critical_factor)

    def observe(self, batch_size: int, seconds: float) -> None:
        pass

    def decide(self, current: int, reading: NoiseScale | None, samples_seen: int,
               limits: BatchLimits) -> int:
        if not usable_reading(reading, limits.min_estimate_steps):
            return current
        lower, upper = limits.bounds(reading)
        if self.critical_factor * lower > current:
            return limits.accept(current, self.critical_factor * lower)
        if self.critical_factor * upper < current:
            return limits.accept(current, self.critical_factor * upper)
        return current

    def state_dict(self) -> dict:
        return {"name": self.name, "critical_factor": self.critical_factor}

    def load_state_dict(self, state: dict) -> None:
        self.critical_factor = state["critical_factor"]


class GoodputPolicy:
    """Maximise goodput (Pollux/AdaptDL, Qiao et al. 2021):

        goodput(B) = throughput(B) · efficiency(B)
                   = B / (α + β·B) · (φ + B0) / (φ + B),     φ = B_simple,

    efficiency being the progress per sample relative to the initial batch
    B0 under McCandlish's model (a batch-B step is worth 1/(1 + φ/B) noiseless
    steps). time(B) = α + β·B (seconds per optimizer step: α the per-step
    overhead, β the cost per sample) is a least-squares fit, weighted by the
    number of steps, to the mean time of each batch size measured. Its
    maximiser is B* = sqrt(α φ / β); the valid sizes either side of B* (within
    the bounds, and ≥ the current batch when grow-only) are compared.

    Prior: while the measured batch sizes span less than a factor
    `min_spread` (a single size, or a batch and the smaller last step of an
    epoch), α and β cannot be told apart from timing noise; the fit then
    assumes a share `prior_overhead` of the (pooled) step time is overhead.
    With the default 0.5 this puts B* at sqrt(B·φ), the geometric mean of
    the current batch and the noise scale: a cautious first move that also
    yields the second, distinct size the fit needs.

    The controller feeds it the seconds of every optimizer step (the slowest
    rank's under DDP) except the first one of each process, which pays for
    warm-up (allocations, lazy initialisation).
    """
    name = "goodput"

    def __init__(self, prior_overhead: float = 0.5, min_spread: float = 1.5):
        if not 0.0 < prior_overhead < 1.0:
            raise ValueError(f"GoodputPolicy: `prior_overhead` must be in (0, 1), got "
                             f"{prior_overhead!r}")
        if not min_spread > 1.0:
            raise ValueError(f"GoodputPolicy: `min_spread` must be > 1, got {min_spread!r}")
        self.prior_overhead = float(prior_overhead)
        self.min_spread = float(min_spread)
        self.times: dict[int, list[float]] = {}   # batch -> [steps, Σ seconds]

    def observe(self, batch_size: int, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            entry = self.times.setdefault(int(batch_size), [0, 0.0])
            entry[0] += 1
            entry[1] += float(seconds)

    def fit(self) -> tuple[float, float] | None:
        """(α, β) of time(B) = α + β·B, both ≥ 0, or None without data."""
        points = [(b, n, s / n) for b, (n, s) in sorted(self.times.items()) if n > 0]
        if not points:
            return None
        w = sum(n for _, n, _ in points)
        mean_b = sum(n * b for b, n, _ in points) / w
        mean_t = sum(n * t for _, n, t in points) / w
        if points[-1][0] < self.min_spread * points[0][0]:
            return self.prior_overhead * mean_t, (1.0 - self.prior_overhead) * mean_t / mean_b
        var = sum(n * (b - mean_b) ** 2 for b, n, _ in points)
        cov = sum(n * (b - mean_b) * (t - mean_t) for b, n, t in points)
        beta = cov / var
        alpha = mean_t - beta * mean_b
        if beta < 0:
            return mean_t, 0.0
        if alpha < 0:
            return 0.0, sum(n * t * b for b, n, t in points) / sum(n * b * b for b, n, _ in points)
        return alpha, beta

    @staticmethod
    def goodput(batch: float, alpha: float, beta: float, phi: float, initial_batch: float
                ) -> float:
        """Samples per second, discounted to initial-batch-equivalent progress."""
        return batch / (alpha + beta * batch) * (phi + initial_batch) / (phi + batch)

    def best(self, current: int, phi: float, limits: BatchLimits) -> int | None:
        """The valid batch of highest goodput (None without timing data)."""
        fit = self.fit()
        if fit is None:
            return None
        alpha, beta = fit
        lo = current if limits.grow_only else limits.min_batch
        hi = limits.max_batch
        if beta <= 0:
            return hi
        if alpha <= 0:
            return lo
        b_star = math.sqrt(alpha * phi / beta)
        below = math.floor(b_star / limits.unit) * limits.unit
        candidates = {min(max(b, lo), hi) for b in (below, below + limits.unit)}
        return max(sorted(candidates),
                   key=lambda b: self.goodput(b, alpha, beta, phi, limits.initial_batch))

    def decide(self, current: int, reading: NoiseScale | None, samples_seen: int,
               limits: BatchLimits) -> int:
        if not usable_reading(reading, limits.min_estimate_steps):
            return current
        # grow on B_simple's lower bound, shrink on its upper one
        lower, upper = limits.bounds(reading)
        best = self.best(current, max(lower, 0.0), limits)
        if best is not None and best < current:
            # a shrink needs the upper bound to ask for one too, and goes as far as it asks
            cautious = self.best(current, upper, limits)
            best = cautious if cautious is not None and cautious < current else current
        return current if best is None else limits.accept(current, best)

    def state_dict(self) -> dict:
        return {"name": self.name, "prior_overhead": self.prior_overhead,
                "min_spread": self.min_spread,
                "times": {b: list(v) for b, v in self.times.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prior_overhead, self.min_spread = state["prior_overhead"], state["min_spread"]
        self.times = {int(b): list(v) for b, v in state["times"].items()}


class SchedulePolicy:
    """A fixed batch-size ramp over samples seen: a callable
    samples_seen -> batch, or a list of (samples_seen threshold, batch)
    pairs, thresholds increasing (the batch of the last threshold reached;
    the initial batch before the first). Followed as given, rounded to a
    valid size and clamped to the bounds: no hysteresis, and it may shrink
    the batch whatever grow_only says."""
    name = "schedule"

    def __init__(self, schedule):
        if callable(schedule):
            self.schedule = schedule
            return
        try:
            pairs = [(int(t), int(b)) for t, b in schedule]
        except (TypeError, ValueError):
            raise ValueError("AdaptiveBatch: `schedule` must be a callable samples_seen -> batch "
                             "or a list of (samples_seen threshold, batch) pairs, got "
                             f"{schedule!r}") from None
        if not pairs:
            raise ValueError("AdaptiveBatch: `schedule` is an empty list")
        if any(t < 0 or b < 1 for t, b in pairs):
            raise ValueError(f"AdaptiveBatch: `schedule` thresholds must be ≥ 0 and batches ≥ 1, "
                             f"got {pairs}")
        if any(t2 <= t1 for (t1, _), (t2, _) in zip(pairs, pairs[1:])):
            raise ValueError(f"AdaptiveBatch: `schedule` thresholds must increase, got {pairs}")
        self.schedule = pairs

    def wanted(self, samples_seen: int) -> int | None:
        if callable(self.schedule):
            return int(self.schedule(samples_seen))
        chosen = None
        for threshold, batch in self.schedule:
            if samples_seen >= threshold:
                chosen = batch
        return chosen

    def observe(self, batch_size: int, seconds: float) -> None:
        pass

    def decide(self, current: int, reading: NoiseScale | None, samples_seen: int,
               limits: BatchLimits) -> int:
        wanted = self.wanted(samples_seen)
        return current if wanted is None else limits.round(wanted)

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        pass


class ramp_schedule:
    """Megatron-LM's batch-size ramp-up (``--rampup-batch-size start increment
    samples``, as in GPT-3's training): start at `start`, add `increment`
    in equal intervals of samples so as to reach `stop` after `ramp_samples`
    samples, then stay at `stop`. A picklable callable samples -> batch for
    policy="schedule"."""

    def __init__(self, start: int, stop: int, increment: int, ramp_samples: int):
        if not (0 < start <= stop and increment > 0 and ramp_samples > 0):
            raise ValueError("ramp_schedule: need 0 < start ≤ stop, increment > 0 and "
                             "ramp_samples > 0")
        if (stop - start) % increment:
            raise ValueError(f"ramp_schedule: stop − start = {stop - start} is not a multiple of "
                             f"increment = {increment}")
        self.start, self.stop = start, stop
        self.increment, self.ramp_samples = increment, ramp_samples

    def __call__(self, samples_seen: int) -> int:
        increments = (self.stop - self.start) // self.increment
        if increments == 0:
            return self.stop
        per = self.ramp_samples / increments
        return min(self.stop, self.start + self.increment * int(samples_seen // per))
