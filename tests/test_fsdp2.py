"""GradNoiseTracker and GradientNoiseScale on models sharded by FSDP2
(torch.distributed.fsdp.fully_shard), 2 processes on gloo, CPU, against one
process holding the whole model and the global batch.

One spawn runs every scenario and writes each rank's results to a file; the
references are computed here, in the test process, without any process group.
Every process group has a timeout, every spawn is bounded by its test's, and
mp.spawn ends the other rank when one raises.

The models are float64. The tracker returns its per-sample norms in float32
whatever the model's dtype, and the FSDP2 run computes each sample's norm
from a local batch of 4 where the reference has 8 (the kernels may block and
sum differently): the per-layer values agree to an ulp of float32, the totals
over layers to a few, well within rtol 1e-6. The noise-scale readings sum
those values in float64.
"""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from gradnoise import GradNoiseTracker
from gradnoise.noise_scale import GradientNoiseScale
from tests.helpers import TinyLM, leave_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")

WORLD, GLOBAL_B, STEPS, LR = 2, 8, 4, 0.1
LOCAL_B = GLOBAL_B // WORLD
MAX_NORM = 0.5          # below the gradients' norms: clipping changes the steps
RTOL = 1e-6


# ---------------------------------------------------------------- models, data
def mlp() -> nn.Module:
    """Linear layers whose dim 0 (9, 5, 1) do not split evenly over 2 ranks:
    the last layer's shards on rank 1 are empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(),
                         nn.Linear(5, 1)).double()


def tiny_lm() -> nn.Module:
    """Embedding tied to the head, a captured positional embedding, LayerNorm
    and attention blocks written from nn.Linear."""
    torch.manual_seed(0)
    return TinyLM().double()


class Outside(nn.Module):
    """Uses its child's weight in its own forward, outside the child's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + F.linear(x, self.lin.weight)


def outside_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Outside(), nn.Linear(4, 2)).double()


def mlp_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_B, 7, generator=gen, dtype=torch.float64),
             torch.randn(GLOBAL_B, 1, generator=gen, dtype=torch.float64))
            for _ in range(STEPS)]


def lm_batches():
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, 23, (GLOBAL_B, 9), generator=gen)
        x[:, -2] = 0                      # padding tokens
        y = torch.roll(x, -1, 1)
        y[:, -1] = -100                   # every sample has the same count of targets
        out.append((x, y))
    return out


def mlp_loss(model, x, y):
    return F.mse_loss(model(x), y)


def lm_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)


CASES = {"mlp": (mlp, mlp_batches, mlp_loss), "lm": (tiny_lm, lm_batches, lm_loss)}


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """fully_shard each Linear of an MLP, or each block of the LM, then the root."""
    from torch.distributed.fsdp import fully_shard
    inner = model.blocks if isinstance(model, TinyLM) else [
        m for m in model if isinstance(m, nn.Linear)]
    for m in inner:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local(batch, rank):
    """This rank's contiguous share of a global batch."""
    return tuple(t[rank * LOCAL_B:(rank + 1) * LOCAL_B] for t in batch)


# --------------------------------------------------------------- the training
def per_sample_norms(model, batches, loss_fn, rank=None):
    """{layer: float64 [B]} of the tracker at each step, an SGD step between."""
    tracker = GradNoiseTracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for batch in batches[:2]:
        x, y = batch if rank is None else local(batch, rank)
        loss_fn(model, x, y).backward()
        out.append({k: v.double() for k, v in tracker.per_layer_sq_norms().items()})
        opt.step()
        opt.zero_grad()
    tracker.detach()
    return out


def reading(r):
    return None if r is None else (r.sq_norm, r.trace, r.b_simple)


def noise_readings(model, batches, loss_fn, rank=None, clip=False, per_layer=False,
                   accumulate=False):
    """GradientNoiseScale(source="per_sample") over STEPS steps of SGD: each
    step's reading, then the per-layer readings, and the type of the norm
    clip_grad_norm_ returned. On a rank, `accumulate` splits its share into 2
    backward passes, the first without FSDP2's gradient reduction."""
    gns = GradientNoiseScale(model, per_layer=per_layer)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps, norm_type = [], None
    for batch in batches:
        x, y = batch if rank is None else local(batch, rank)
        if accumulate:
            half = x.shape[0] // 2
            for j in range(2):
                model.set_requires_gradient_sync(j == 1)
                part = slice(j * half, (j + 1) * half)
                (loss_fn(model, x[part], y[part]) / 2).backward()
                gns.after_backward(0.5, half)
        else:
            loss_fn(model, x, y).backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            norm_type = type(norm).__name__
            steps.append(reading(gns.step(x.shape[0], grad_norm=norm)))
        else:
            steps.append(reading(gns.step(x.shape[0])))
        opt.step()
        opt.zero_grad()
    layers = {k: reading(v) for k, v in gns.read_layers().items()}
    gns.close()
    return {"steps": steps, "layers": layers, "norm_type": norm_type}


NOISE_SCENARIOS = {           # name: (case, options)
    "mlp": ("mlp", {}),
    "mlp_per_layer": ("mlp", {"per_layer": True}),
    "mlp_clip": ("mlp", {"clip": True}),
    "mlp_clip_per_layer": ("mlp", {"clip": True, "per_layer": True}),
    "mlp_accumulate": ("mlp", {"accumulate": True}),
    "lm_clip": ("lm", {"clip": True}),
}


def refusals(model):
    """The errors of GradientNoiseScale's other sources on a sharded model."""
    out = {}
    for source in ("micro_batch", "distributed"):
        try:
            GradientNoiseScale(model, source=source)
        except ValueError as e:
            out[source] = str(e)
        else:
            out[source] = None
    return out


def adaptive_run(model, micro_batch):
    """AdaptiveBatch over 96 regression samples for 16 steps, the batch free
    to grow from 8: (history without times, the final weights)."""
    from gradnoise.adaptive import AdaptiveBatch
    from tests.helpers import index_dataset
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(96, 7, generator=gen, dtype=torch.float64)
    y = x[:, :1] + 3.0 * torch.randn(96, 1, generator=gen, dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    c = AdaptiveBatch(model, opt, data, initial_batch=8, max_batch=32, micro_batch=micro_batch,
                      hysteresis=0.0, confidence=0.0, warmup_steps=2)
    for xb, yb in c.run(max_steps=16):
        c.backward(mlp_loss(model, xb, yb))
        c.step(clip_grad_norm=MAX_NORM)
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in c.history]
    full = [getattr(p, "full_tensor", lambda p=p: p)().detach().clone()
            for p in model.parameters()]
    c.close()
    return {"history": history, "params": full, "source": c.noise_source}


# ------------------------------------------------------------------ the ranks
def _init(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=15))


def _worker(rank, init_file, result_file):
    _init(rank, init_file)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        out = {"norms": {}, "noise": {}}
        for name, (make, batches, loss_fn) in CASES.items():
            out["norms"][name] = per_sample_norms(shard(make()), batches(), loss_fn, rank)
        for name, (case, options) in NOISE_SCENARIOS.items():
            make, batches, loss_fn = CASES[case]
            out["noise"][name] = noise_readings(shard(make()), batches(), loss_fn, rank,
                                                **options)
        # HSDP: a 2 × 1 mesh, gradients replicated over the ranks
        model = shard(mlp(), init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("rep", "shard")))
        out["noise"]["mlp_hsdp"] = noise_readings(model, mlp_batches(), mlp_loss, rank)
        out["hsdp_placements"] = [repr(p) for p in model[0].weight.placements]
        out["refusals"] = refusals(shard(mlp()))
        out["adaptive"] = adaptive_run(shard(mlp()), micro_batch=2)
        try:
            adaptive_run(shard(mlp()), micro_batch=None)
        except ValueError as e:
            out["adaptive_refusal"] = str(e)
        else:
            out["adaptive_refusal"] = ""
        model = shard(outside_model())
        GradNoiseTracker(model)
        try:
            model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        except RuntimeError as e:
            out["outside"] = str(e)
        else:
            out["outside"] = None
        with open(f"{result_file}.{rank}", "wb") as f:
            pickle.dump(out, f)
        leave_group()
    finally:
        dist.destroy_process_group()


def _failing_worker(rank, init_file, result_file):
    _init(rank, init_file)
    try:
        model = shard(mlp())
        gns = GradientNoiseScale(model)
        x, y = local(mlp_batches()[0], rank)
        mlp_loss(model, x, y).backward()
        if rank == 1:
            raise RuntimeError(f"rank {rank} fails on purpose")
        gns.step(x.shape[0])          # rank 0 waits in the all-reduce
        leave_group()
    finally:
        dist.destroy_process_group()


def _spawn(worker):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(worker, args=(init_file, result_file), nprocs=WORLD, join=True)
        results = []
        for r in range(WORLD):
            with open(f"{result_file}.{r}", "rb") as f:
                results.append(pickle.load(f))
        return results


@pytest.fixture(scope="module")
def ranks():
    return _spawn(_worker)


# ------------------------------------------------------------------ the checks
def assert_readings_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is None:
            continue
        sq_norm, trace, b_simple = g
        assert sq_norm == pytest.approx(w[0], rel=RTOL)
        assert trace == pytest.approx(w[1], rel=RTOL)
        assert (b_simple is None) == (w[2] is None)
        if w[2] is not None:
            assert b_simple == pytest.approx(w[2], rel=RTOL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_norms_equal_single_process(ranks, case):
    """Each rank's per-sample norms, layer by layer, are the single-process
    norms of its samples (two steps, an optimizer step between)."""
    make, batches, loss_fn = CASES[case]
    want = per_sample_norms(make(), batches(), loss_fn)
    for rank, result in enumerate(ranks):
        got = result["norms"][case]
        assert len(got) == len(want)
        for step_got, step_want in zip(got, want):
            assert list(step_got) == list(step_want)
            for layer, values in step_want.items():
                expected = values[rank * LOCAL_B:(rank + 1) * LOCAL_B]
                torch.testing.assert_close(step_got[layer], expected, rtol=RTOL, atol=0)
            total = sum(step_got.values())
            expected = sum(step_want.values())[rank * LOCAL_B:(rank + 1) * LOCAL_B]
            torch.testing.assert_close(total, expected, rtol=RTOL, atol=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", [*NOISE_SCENARIOS, "mlp_hsdp"])
def test_noise_scale_equals_single_process_on_the_global_batch(ranks, scenario):
    """Every rank's reading, step by step, is that of one process on the
    union of the ranks' samples, optimizer steps (and clipping) included."""
    case, options = NOISE_SCENARIOS.get(scenario, ("mlp", {}))
    make, batches, loss_fn = CASES[case]
    options = {k: v for k, v in options.items() if k != "accumulate"}
    want = noise_readings(make(), batches(), loss_fn, **options)
    assert any(w is not None and w[2] is not None for w in want["steps"])
    for result in ranks:
        got = result["noise"][scenario]
        assert_readings_equal(got["steps"], want["steps"])
        assert sorted(got["layers"]) == sorted(want["layers"])
        for layer, w in want["layers"].items():
            assert_readings_equal([got["layers"][layer]], [w])
    if options.get("clip"):
        # under FSDP2, clip_grad_norm_ returns the total norm as a DTensor
        assert all(r["noise"][scenario]["norm_type"] == "DTensor" for r in ranks)
    if options.get("per_layer"):
        assert len(want["layers"]) == 3


@pytest.mark.timeout(120)
def test_adaptive_batch_on_fsdp2_takes_the_decisions_of_one_process(ranks):
    """Each rank takes its contiguous share of every global batch, two
    micro-batches of 2 with the gradient sync off for the first; the
    single process takes the global batch in micro-batches of 4."""
    want = adaptive_run(mlp(), micro_batch=4)
    for result in ranks:
        got = result["adaptive"]
        assert got["source"] == "per_sample"
        assert [r["batch_size"] for r in got["history"]] == [
            r["batch_size"] for r in want["history"]]
        assert len({r["batch_size"] for r in want["history"]}) > 1     # the batch moved
        for g, w in zip(got["history"], want["history"]):
            for k in ("loss", "b_simple", "b_simple_stderr", "lr", "lr_factor"):
                assert (g[k] is None) == (w[k] is None)
                if w[k] is not None:
                    assert g[k] == pytest.approx(w[k], rel=RTOL)
        for p, q in zip(got["params"], want["params"]):
            torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-12)


def test_adaptive_batch_on_fsdp2_needs_a_micro_batch(ranks):
    for result in ranks:
        assert "give `micro_batch`" in result["adaptive_refusal"]


def test_hsdp_gradients_are_replicated(ranks):
    """The HSDP run above reads gradients replicated over the ranks: each
    rank's copy counts once in ‖G_B‖²."""
    assert all(r["hsdp_placements"] == ["Replicate()", "Shard(dim=0)"] for r in ranks)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", ["micro_batch", "distributed"])
def test_hooked_sources_refuse_a_sharded_model(ranks, source):
    for result in ranks:
        message = result["refusals"][source]
        assert message is not None
        assert f"source={source!r}" in message and "FSDP2" in message
        assert "source='per_sample'" in message


@pytest.mark.timeout(120)
def test_use_outside_the_measuring_module_is_found_under_fsdp2(ranks):
    """A block that uses its child's weight outside the child's forward is
    refused as in one process, though the parameters it holds while it runs
    are FSDP2's unsharded copies."""
    for result in ranks:
        message = result["outside"]
        assert message is not None
        assert "used outside the forward" in message and "1.lin.weight" in message


@pytest.mark.timeout(120)
def test_a_failing_rank_ends_every_rank_with_an_error():
    with pytest.raises(Exception, match="fails on purpose|terminated|exited"):
        _spawn(_failing_worker)


def test_refusal_names_fsdp2_without_a_process_group():
    """The check needs no process group: any module that is an FSDPModule."""
    from torch.distributed.fsdp import FSDPModule

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})   # as fully_shard does
    for source in ("micro_batch", "distributed"):
        with pytest.raises(ValueError, match=r"FSDP2.*'2'.*source='per_sample'"):
            GradientNoiseScale(model, source=source)
    GradientNoiseScale(model, source="per_sample").close()
