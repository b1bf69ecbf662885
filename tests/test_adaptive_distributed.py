"""AdaptiveBatch under DistributedDataParallel on gloo, 2 processes: every rank
takes the same decisions and reads its own contiguous, disjoint share of each
global batch. Every process group has a timeout, and the spawn is bounded by
the test's."""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradnoise.adaptive import AdaptiveBatch
from gradnoise.data import EpochSampler, shard_sizes
from tests.helpers import index_dataset, leave_group

N, SEED, EPOCHS, WORLD = 90, 5, 3, 2
# Linear(3, 1) saves 12 bytes a sample and holds 32 bytes of parameters and
# gradients: the budgets let rank 0 fit 2 samples and rank 1 fit 4; the ranks
# must agree on the smaller.
PROBE_BUDGET = (32 + 12 * 2, 32 + 12 * 4)
SCENARIOS = {
    "critical": dict(policy="critical", noise_source="auto"),
    "goodput": dict(policy="goodput", noise_source="auto"),
    "per_sample": dict(policy="critical", noise_source="per_sample", lr_rule="adascale"),
    "probed": dict(policy="critical", micro_batch=None),
}


def _worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        out = {}
        for name, kw in SCENARIOS.items():
            torch.manual_seed(0)
            model = nn.Linear(3, 1)
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
            kw = {"micro_batch": 2, **kw}
            if kw["micro_batch"] is None:
                kw["memory_budget"] = PROBE_BUDGET[rank]
            c = AdaptiveBatch(ddp, opt, index_dataset(N), initial_batch=8, max_batch=48,
                              warmup_steps=3, seed=SEED, **kw)
            seen = []
            for x, y, idx in c.epochs(EPOCHS):
                c.backward(F.mse_loss(ddp(x), y))
                seen.append(idx.tolist())
                c.step()
            out[name] = {"history": c.history, "seen": seen, "source": c.noise_source,
                         "params": [p.detach().clone() for p in model.parameters()]}
            c.close()
        with open(f"{result_file}.{rank}", "wb") as f:
            pickle.dump(out, f)
        leave_group()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_worker, args=(WORLD, init_file, result_file), nprocs=WORLD, join=True)
        outs = []
        for r in range(WORLD):
            with open(f"{result_file}.{r}", "rb") as f:
                outs.append(pickle.load(f))
        return outs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ranks_take_identical_decisions_on_disjoint_shares(results, scenario):
    ranks = [r[scenario] for r in results]
    history = ranks[0]["history"]
    # identical records on every rank: batch, LR, noise scale, loss, step time
    assert all(r["history"] == history for r in ranks)
    assert ranks[0]["source"] == ("per_sample" if scenario == "per_sample" else "distributed")
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert {rec["micro_batch"] for rec in history} == {2}
    batches = [rec["batch_size"] for rec in history]
    if scenario != "goodput":
        assert len(set(batches)) > 1, batches          # the batch did grow
    assert any(rec["b_simple"] is not None for rec in history)

    # replay the sampler: each step's global batch, split into contiguous shares
    sampler = EpochSampler(N, seed=SEED)
    cursor = [0] * WORLD
    per_epoch: dict[int, list[int]] = {}
    for rec in history:
        epoch, expected = sampler.take(rec["batch_size"])
        assert epoch == rec["epoch"]
        shares = []
        for r, out in enumerate(ranks):
            parts = out["seen"][cursor[r]:cursor[r] + rec["accumulation"]]
            cursor[r] += rec["accumulation"]
            assert all(len(p) <= 2 + 1 for p in parts)
            shares.append([i for p in parts for i in p])
        assert [len(s) for s in shares] == shard_sizes(len(expected), WORLD)
        assert shares[0] + shares[1] == expected
        assert not set(shares[0]) & set(shares[1])
        per_epoch.setdefault(epoch, []).extend(expected)
    assert cursor == [len(out["seen"]) for out in ranks]
    assert sorted(per_epoch) == list(range(EPOCHS))
    assert all(sorted(v) == list(range(N)) for v in per_epoch.values())


@pytest.mark.timeout(300)
def test_recorded_loss_is_the_mean_over_all_ranks(results):
    history = results[0]["critical"]["history"]
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y, _ = index_dataset(N)[EpochSampler(N, seed=SEED).take(8)[1]]
    with torch.no_grad():
        expected = F.mse_loss(model(x), y).item()
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-6)
