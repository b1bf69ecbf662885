"""Interleaved timing: every repetition runs each candidate once, in turn, so
that a machine that speeds up or slows down during the run affects all of
them alike; ratios are taken within a repetition, then the median is kept."""
from __future__ import annotations

import gc
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


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved_pairs(steps: dict[str, Callable], first: dict[str, float], repeats: int,
                 warmup: int, slow_budget_s: float, min_repeats: int, tick,
                 own_plain: dict[str, tuple] | None = None
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(times, paired plain times). Each repetition runs every candidate once,
    in an order rotated by one per repetition, each right next to a plain
    step (before it in even repetitions, after it in odd ones): a candidate's
    ratio to the plain step is taken against that neighbour, so that this
    machine's drift in speed between the two is seconds, not a repetition.
    The neighbour is the candidate's own model's plain step where
    `own_plain` has one (Prepared.own_plain), else the shared plain model's.
    A candidate whose step × `repeats` would exceed `slow_budget_s` runs only
    in the first max(min_repeats, budget / step) repetitions."""
    reps = {}
    for name in steps:
        t = first[name]
        reps[name] = repeats if t * repeats <= slow_budget_s else \
            min(repeats, max(min_repeats, int(slow_budget_s // max(t, 1e-9))))
    for _ in range(warmup):
        for name, fn in steps.items():
            if reps[name] == repeats:
                fn()
    plain = steps["plain"]
    own_plain = own_plain or {}

    def time_plain(name: str) -> float:
        if name not in own_plain:
            t = _time(plain)
            times["plain"].append(t)
            return t
        before, step, after = own_plain[name]
        before()
        try:
            return _time(step)
        finally:
            after()

    names = [n for n in steps if n != "plain"]
    times: dict[str, list[float]] = {n: [] for n in steps}
    paired: dict[str, list[float]] = {n: [] for n in steps}
    for name, (before, step, after) in own_plain.items():
        for _ in range(warmup):
            before()
            step()
            after()
    for r in range(repeats):
        k = r % max(1, len(names))
        shared_before = len(times["plain"])
        for name in names[k:] + names[:k]:
            if r >= reps[name]:
                continue
            if r % 2 == 0:
                tp = time_plain(name)
                tc = _time(steps[name])
            else:
                tc = _time(steps[name])
                tp = time_plain(name)
            times[name].append(tc)
            paired[name].append(tp)
        if len(times["plain"]) == shared_before:  # every candidate had its own
            times["plain"].append(_time(plain))
        paired["plain"] = times["plain"]
        gc.collect()
        tick()
    return times, paired
