"""Interleaved timing: every repetition runs each candidate once, in turn, so
that a machine that speeds up or slows down during the run affects all of
them alike; ratios are taken within a repetition, then the median is kept."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved_times(candidates: Mapping[str, Callable[[], object]], repeats: int,
                      warmup: int = 2, on_repeat: Callable[[], None] | None = None
                      ) -> dict[str, list[float]]:
    """Seconds per call of each candidate, `repeats` samples each."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if on_repeat is not None:
            on_repeat()
    return times


def median_ratio(times: Mapping[str, list[float]], name: str, baseline: str) -> float:
    """Median over repetitions of time(name) / time(baseline)."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))
