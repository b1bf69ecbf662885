"""GradientNoiseScale under DistributedDataParallel on gloo, 2 and 4 processes.
Every process group has a timeout, and every spawn is bounded by the test's."""
from __future__ import annotations

import datetime
import math
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradnoise.noise_scale import GradientNoiseScale
from tests.helpers import (DELTA_SQ, TRUE_B_SIMPLE, leave_group, loss_fn, regression_batch,
                           regression_model)

STEPS, LOCAL_B = 12, 8


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=15))


def _quiesce(ddp, gns):
    gns.close()
    del ddp
    leave_group()


def _global_batches(world, uneven=False, steps=STEPS):
    """uneven: "last" (the last step's shards shrink by rank), "all" (every
    step's shards differ), or False."""
    gen = torch.Generator().manual_seed(11)
    _, w_star = regression_model()
    out = []
    for step in range(steps):
        sizes = [LOCAL_B] * world
        if uneven == "all" or (uneven and step == steps - 1):
            sizes = [LOCAL_B - 3 * r for r in range(world)]
        out.append([regression_batch(gen, n, w_star) for n in sizes])
    return out


def _worker(rank, world, init_file, result_file, uneven, fail_rank, nan_rank=-1, steps=STEPS,
            beta=0.95):
    _init(rank, world, init_file)
    try:
        model, _ = regression_model()
        ddp = DDP(model)
        gns = GradientNoiseScale(ddp.module, source="distributed", beta=beta)
        for step, parts in enumerate(_global_batches(world, uneven, steps)):
            if rank == fail_rank and step == 3:
                raise RuntimeError(f"rank {rank} fails on purpose")
            model.zero_grad()
            x, y = parts[rank]
            if rank == nan_rank and step == 3:
                x = x.clone()
                x[0, 0] = float("nan")
            loss_fn(ddp, x, y).backward()
            gns.step(x.shape[0])
        with open(f"{result_file}.{rank}", "wb") as f:
            pickle.dump((gns.read(), gns.estimator.state_dict()), f)
        _quiesce(ddp, gns)
    finally:
        dist.destroy_process_group()


def _run(world, uneven=False, fail_rank=-1, nan_rank=-1, steps=STEPS, beta=0.95):
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_worker, args=(world, init_file, result_file, uneven, fail_rank, nan_rank, steps,
                                beta),
                 nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(f"{result_file}.{r}", "rb") as f:
                results.append(pickle.load(f))
        return results


def _single_process_accumulation(world, uneven=False):
    """The same batches as micro-batches of one process, each backward's
    mean loss weighted 1/R as DDP's average weights each rank's."""
    model, _ = regression_model()
    gns = GradientNoiseScale(model, source="micro_batch")
    for parts in _global_batches(world, uneven):
        model.zero_grad()
        for x, y in parts:
            (loss_fn(model, x, y) / world).backward()
            gns.after_backward(1.0 / world, x.shape[0])
        gns.step(sum(x.shape[0] for x, _ in parts))
    return gns.read()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_agree_with_single_process_accumulation(world):
    results = _run(world)
    reference = _single_process_accumulation(world)
    for reading, _ in results:
        assert reading.b_simple == pytest.approx(reference.b_simple, rel=1e-6)
        assert reading.sq_norm == pytest.approx(reference.sq_norm, rel=1e-6)
        assert reading.trace == pytest.approx(reference.trace, rel=1e-6)
    # every rank holds the same state
    states = [s for _, s in results]
    assert all(s == states[0] for s in states)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("uneven", ["last", "all"])
def test_uneven_shards_match_single_process_accumulation(uneven):
    """Shards of 8 and 5 samples: each rank's own batch size enters the
    estimate (harmonic b, B_eff = R²/Σ 1/b_r for DDP's average of means), as
    it does for the same micro-batches declared in one process."""
    results = _run(2, uneven=uneven)
    reference = _single_process_accumulation(2, uneven)
    for reading, _ in results:
        assert reading.steps == STEPS
        assert reading.b_simple == pytest.approx(reference.b_simple, rel=1e-6)
        assert reading.sq_norm == pytest.approx(reference.sq_norm, rel=1e-6)
        assert reading.trace == pytest.approx(reference.trace, rel=1e-6)
    assert results[0][1] == results[1][1]


@pytest.mark.timeout(240)
def test_closed_form_linear_regression_on_two_ranks():
    """The closed form of B_simple for linear regression (tests/test_noise_scale.py)
    from the distributed source: 2 ranks × 8 samples, fresh batches."""
    results = _run(2, steps=1500, beta=0.995)
    reading, _ = results[0]
    assert reading.b_simple == pytest.approx(TRUE_B_SIMPLE, rel=0.05)
    assert reading.sq_norm == pytest.approx(DELTA_SQ, rel=0.1)
    assert results[0][1] == results[1][1]


@pytest.mark.timeout(240)
def test_non_finite_gradients_on_one_rank_skip_the_step_on_every_rank():
    results = _run(2, nan_rank=1)
    for reading, state in results:
        assert reading.skipped_steps == 1 and reading.steps == STEPS - 1
        assert all(math.isfinite(v) for v in (reading.b_simple, reading.sq_norm, reading.trace))
    assert results[0][1] == results[1][1]


@pytest.mark.timeout(240)
def test_a_failing_rank_ends_every_rank_with_an_error():
    with pytest.raises(Exception, match="fails on purpose|terminated|exited"):
        _run(2, fail_rank=1)


def _unused_worker(rank, world, init_file, result_file, uneven, fail_rank):
    _init(rank, world, init_file)
    try:
        torch.manual_seed(0)
        model = nn.ModuleDict({"used": nn.Linear(4, 1), "unused": nn.Linear(4, 1)})

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, x):
                return self.m["used"](x)

        net = Net()
        ddp = DDP(net, find_unused_parameters=True)
        gns = GradientNoiseScale(net, source="distributed", per_layer=True)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(4):
            net.zero_grad()
            x = torch.randn(6, 4, generator=gen)
            ddp(x).square().mean().backward()
            gns.step(6)
        with open(f"{result_file}.{rank}", "wb") as f:
            pickle.dump((gns.read(), sorted(gns.read_layers())), f)
        _quiesce(ddp, gns)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_unused_parameters():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_unused_worker, args=(2, init_file, result_file, False, -1), nprocs=2, join=True)
        outs = []
        for r in range(2):
            with open(f"{result_file}.{r}", "rb") as f:
                outs.append(pickle.load(f))
    assert outs[0] == outs[1]
    assert outs[0][1] == ["m.used"]
