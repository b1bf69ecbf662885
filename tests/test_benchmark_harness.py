"""The training-step benchmark's interleaving: which plain step each
candidate is paired with (the compiled steps with the compiled plain step)."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from gradnoise.benchmarking import models
from gradnoise.benchmarking.timing import interleaved_pairs
from gradnoise.benchmarking.tracker_step import run


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


def test_compiled_candidates_pair_with_the_compiled_plain_step(monkeypatch):
    """A compiled tracked step's ratio is to the compiled plain step (added
    when not asked for), its norms are checked, and its row carries the graph
    breaks of its forward."""
    def tiny(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        return model, torch.randn(4, 6), torch.randint(0, 3, (4,)), F.cross_entropy

    monkeypatch.setitem(models.MODELS, "tiny", tiny)
    rows = run(["tiny"], repeats=2, candidates=["gradnoise all", "compiled gradnoise all"],
               memory=False, warmup=1)
    by = {r.candidate: r for r in rows}
    assert list(by) == ["plain", "compiled plain", "gradnoise all", "compiled gradnoise all"]
    assert by["compiled plain"].baseline == "plain"
    assert by["compiled gradnoise all"].baseline == "compiled plain"
    assert by["compiled plain"].graph_breaks == 0 and by["plain"].graph_breaks is None
    assert by["compiled gradnoise all"].graph_breaks > 0
    assert by["compiled gradnoise all"].err_vs_truth < 1e-4
    assert by["compiled gradnoise all"].err_vs_gradnoise < 1e-5   # against the eager tracker
    assert by["compiled gradnoise all"].repeats == 2
    assert "graph breaks" in by["compiled gradnoise all"].note
