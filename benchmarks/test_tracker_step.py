"""pytest-benchmark suite of one training step (forward + backward + per-sample
gradient norms) on the three benchmark models, for gradnoise and its peers,
grouped per model; each timed step's norms are also checked.

    python -m pytest benchmarks/test_tracker_step.py --benchmark-columns=median,iqr,rounds

The ratio table (interleaved repetitions, peak memory, disagreements) is
gradnoise.benchmarking.tracker_step.run / `python -m gradnoise bench --tracker`
(`--compile` adds the compiled steps).

`test_compiled_step` times the model compiled by torch.compile, plain and
tracked, after the steps that compile it, with the tracked forward's graph
breaks in the benchmark's extra_info.

Tolerances (every candidate runs in float32; measured disagreements are
≲ 1e-5):
- gradnoise (layers="all", and "norm" over the norm-layer parameters) against
  per-sample gradients from torch.func in float64: rtol 1e-4;
- a peer that computes the same quantity against gradnoise layers="all":
  rtol 1e-3. torch.func vmap, Opacus hooks and Opacus ghost clipping compute
  it on every model they can run. BackPACK leaves LayerNorm and GroupNorm out
  and handles a tied weight per use, so it is compared with gradnoise's
  per-layer norms over the modules it covers whose parameters are not tied.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from gradnoise import GradNoiseTracker
from gradnoise.benchmarking import models
from gradnoise.benchmarking.peers import (CANDIDATES, COMPILED_CANDIDATES, Unavailable,
                                          norm_layer_params, per_sample_bytes, prepare)
from gradnoise.benchmarking.truth import truth_per_param

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have an extension for Module"),
    pytest.mark.filterwarnings("ignore:.*Full backward hook is firing"),
    # torch.func has no batching rule for CPU flash attention (the LM) and loops.
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
]

MODELS = list(models.MODELS)
TRUTH_RTOL = 1e-4
PEER_RTOL = 1e-3
# Peers whose norms are known to be off on a model: reported (as the table's
# Δ fp64 column does), not held against the benchmark.
KNOWN_PEER_ERRORS = {
    ("gpt2", "opacus hooks"): "Opacus' hooks are 2e-3 from float64 on GPT-2 (Δ fp64 in the table)",
    ("gpt2", "backpack"): "BackPACK takes GPT-2's [1, T] position-embedding call for one sample",
}


@functools.lru_cache(maxsize=None)
def _built(name: str):
    return models.build(name)


@functools.lru_cache(maxsize=None)
def _truth(name: str) -> dict[str, torch.Tensor]:
    model, x, y, loss_fn = _built(name)
    return truth_per_param(model, x, y, loss_fn)


@functools.lru_cache(maxsize=None)
def _gradnoise(name: str):
    """gradnoise layers="all" on this model: (per-sample [B], per-layer {module: [B]})."""
    model, x, y, loss_fn = _built(name)
    m = copy.deepcopy(model)
    tracker = GradNoiseTracker(m, loss_reduction="mean")
    loss_fn(m(x), y).backward()
    return tracker.per_sample_sq_norms().double(), {
        k: v.double() for k, v in tracker.per_layer_sq_norms().items()}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    actual, expected = actual.double(), expected.double()
    err = float(((actual - expected).abs() / expected.abs()).max())
    assert err <= rtol, f"{what}: max relative difference {err:.2e} > {rtol:.0e}"


def _rounds(candidate: str, model, batch: int) -> int:
    # Peers that materialise per-sample gradients take seconds per step on the MLP.
    if candidate in ("torch.func vmap", "opacus hooks") and per_sample_bytes(model, batch) > 2**29:
        return 2
    return 5


def _prepared(model_name, candidate):
    """(model, x, y, loss_fn, the candidate's copy of the model, its Prepared),
    or a skip saying why the candidate cannot run."""
    model, x, y, loss_fn = _built(model_name)
    own = copy.deepcopy(model)
    try:
        return model, x, y, loss_fn, own, prepare(candidate, own, x, y, loss_fn)
    except Unavailable as e:
        pytest.skip(f"n/a: {e}")
    except ImportError as e:
        pytest.skip(f"peer not installed: {e}")


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("model_name", MODELS)
def test_step(benchmark, model_name, candidate):
    benchmark.group = f"train step: {models.DESCRIPTIONS[model_name]}"
    model, x, y, loss_fn, own, prepared = _prepared(model_name, candidate)
    result = benchmark.pedantic(prepared.step, rounds=_rounds(candidate, model, x.shape[0]),
                                warmup_rounds=1)

    if candidate == "plain":
        assert result is None
        assert all(p.grad is not None for p in own.parameters())
        return
    B = x.shape[0]
    assert result.shape == (B,) and bool(torch.isfinite(result).all())
    known = KNOWN_PEER_ERRORS.get((model_name, candidate))
    try:
        _check_norms(candidate, model_name, model, own, result, prepared, B)
    except AssertionError as e:
        if known is None:
            raise
        pytest.xfail(f"{known}: {e}")
    # Every candidate also leaves the batch gradient of the mean loss in .grad (clipped
    # by the one that clips).
    if candidate not in ("gradnoise norm", "gradnoise + noise scale, clipping"):
        ref = copy.deepcopy(model)
        loss_fn(ref(x), y).backward()
        for (n, p), (_, q) in zip(own.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=f"{candidate}: .grad of {n}")


@pytest.mark.parametrize("candidate", COMPILED_CANDIDATES)
@pytest.mark.parametrize("model_name", MODELS)
def test_compiled_step(benchmark, model_name, candidate):
    benchmark.group = f"compiled train step: {models.DESCRIPTIONS[model_name]}"
    model, x, y, loss_fn, own, prepared = _prepared(model_name, candidate)
    for _ in range(prepared.warmup_steps - 1):   # compiling
        prepared.step()
    result = benchmark.pedantic(prepared.step, rounds=5, warmup_rounds=1)
    if candidate != "compiled plain":
        truth = _truth(model_name)
        names = norm_layer_params(model) if candidate.endswith("norm") else list(truth)
        _close(result, sum(truth[k] for k in names), TRUTH_RTOL, f"{candidate} vs torch.func fp64")
    benchmark.extra_info["graph_breaks"] = prepared.graph_breaks()


def _check_norms(candidate, model_name, model, own, result, prepared, B):
    if candidate in ("gradnoise all", "gradnoise + noise scale", "gradnoise + noise scale, clipping"):
        _close(result, sum(_truth(model_name).values()), TRUTH_RTOL,
               f"{candidate} vs torch.func fp64")
        if prepared.estimator_times is not None:
            assert len(prepared.estimator_times) >= 1  # the estimator ran every step
    elif candidate == "gradnoise norm":
        truth = _truth(model_name)
        _close(result, sum(truth[k] for k in norm_layer_params(model)), TRUTH_RTOL,
               "gradnoise norm vs torch.func fp64 over the norm-layer parameters")
    elif candidate == "backpack":
        _check_backpack(own, B, model_name)
    else:
        _close(result, _gradnoise(model_name)[0], PEER_RTOL, f"{candidate} vs gradnoise")


def _check_backpack(model, B: int, model_name: str) -> None:
    """BackPACK's batch_l2 (×B² for the mean loss) against gradnoise's per-layer
    norms, over the modules it covers whose parameters are not tied."""
    uses: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    per_layer = _gradnoise(model_name)[1]
    ours, theirs, compared = 0.0, 0.0, []
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own or any(uses[id(p)] > 1 or not hasattr(p, "batch_l2") for p in own):
            continue
        compared.append(name)
        ours = ours + sum(p.batch_l2.double() for p in own) * B * B
        theirs = theirs + per_layer[name]
    assert compared, "BackPACK covered no untied module"
    _close(ours, theirs, PEER_RTOL, f"backpack vs gradnoise over {compared}")
