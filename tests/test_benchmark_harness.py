"""The training-step benchmark's interleaving: which plain step each
candidate is paired with."""
from __future__ import annotations

import time

from gradnoise.benchmarking.timing import interleaved_pairs


def _sleeper(seconds, log=None, tag=None):
    def step():
        if log is not None:
            log.append(tag)
        time.sleep(seconds)
    return step


def test_candidates_pair_with_their_own_plain_step_when_they_have_one():
    log = []
    steps = {"plain": _sleeper(0.004), "own": _sleeper(0.006), "shared": _sleeper(0.006)}
    own = {"own": (lambda: log.append("before"), _sleeper(0.002, log, "own plain"),
                   lambda: log.append("after"))}
    first = {n: 0.005 for n in steps}
    times, paired = interleaved_pairs(steps, first, repeats=4, warmup=1, slow_budget_s=10.0,
                                 min_repeats=1, tick=lambda: None, own_plain=own)
    ratio = {n: sorted(a / b for a, b in zip(times[n], paired[n]))[2] for n in ("own", "shared")}
    assert 2.3 < ratio["own"] < 3.5          # 6 ms against its own 2 ms
    assert 1.2 < ratio["shared"] < 1.8       # 6 ms against the shared 4 ms
    assert len(times["plain"]) == 4 and len(paired["own"]) == 4
    # the own plain step runs between its before and after, outside the timing
    k = log.index("own plain", 2)
    assert log[k - 1] == "before" and log[k + 1] == "after"


def test_shared_plain_timed_every_repetition_even_if_no_candidate_uses_it():
    steps = {"plain": _sleeper(0.001), "own": _sleeper(0.001)}
    own = {"own": (lambda: None, _sleeper(0.001), lambda: None)}
    times, paired = interleaved_pairs(steps, {n: 0.001 for n in steps}, repeats=3, warmup=0,
                                 slow_budget_s=10.0, min_repeats=1, tick=lambda: None,
                                 own_plain=own)
    assert len(times["plain"]) == 3 and paired["plain"] == times["plain"]
