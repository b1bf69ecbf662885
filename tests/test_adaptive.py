"""The adaptive-batch controller: policies and LR rules on synthetic noise
readings with known answers, exact data accounting, bitwise resumption in a
new process, the micro-batch source for BatchNorm, the memory probe, logs."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from gradnoise.adaptive import (RECORD_FIELDS, AdaptiveBatch, BatchLimits, GoodputPolicy,
                                SchedulePolicy, default_memory_budget, lr_factor,
                                probe_micro_batch, ramp_schedule)
from gradnoise.data import EpochSampler, plan_step
from gradnoise.estimators import NoiseScale
from gradnoise.noise_scale import GradientNoiseScale
from tests.helpers import index_dataset

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers
class FakeNoise:
    """Synthetic readings: B_simple = phi(steps) with ‖G‖² = 1, tr Σ = phi."""
    source = "fake"

    def __init__(self, phi):
        self.phi = phi if callable(phi) else (lambda steps: phi)
        self.steps = 0
        self.batch_sizes = []

    def step(self, batch_size):
        self.steps += 1
        self.batch_sizes.append(batch_size)

    def read(self):
        if self.steps == 0:
            return NoiseScale(None, None, None, None, 0)
        phi = float(self.phi(self.steps))
        return NoiseScale(1.0, phi, phi, 0.0, self.steps)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def make(n=64, d=3, noise="auto", lr=0.01, optimizer=torch.optim.SGD, model=None, **kw):
    torch.manual_seed(0)
    model = model or nn.Linear(d, 1)
    opt = optimizer(model.parameters(), lr=lr)
    kw.setdefault("initial_batch", 8)
    kw.setdefault("max_batch", 64)
    kw.setdefault("micro_batch", 8)
    return AdaptiveBatch(model, opt, index_dataset(n, d), noise_source=noise, **kw), model, opt


def train(controller, model, it=None, on_step=None):
    """The five-line loop; returns the indices of every micro-batch."""
    seen = []
    for x, y, idx in (controller if it is None else it):
        loss = F.mse_loss(model(x), y)
        controller.backward(loss)
        seen.append(idx.tolist())
        if controller.step() and on_step is not None:
            on_step()
    return seen


def column(controller, key):
    return [r[key] for r in controller.history]


# ------------------------------------------------------------------ LR rules
def test_lr_factor_known_values():
    reading = NoiseScale(sq_norm=2.0, trace=6.0, b_simple=3.0, stderr=0.1, steps=20)
    assert lr_factor("none", 128, 32, None) == 1.0
    assert lr_factor("linear", 128, 32, None) == 4.0
    assert lr_factor("sqrt", 128, 32, None) == 2.0
    # AdaScale: (trΣ + ‖G‖²)/(trΣ/s + ‖G‖²), s = 4
    assert lr_factor("adascale", 128, 32, reading) == pytest.approx((6 + 2) / (6 / 4 + 2))
    # McCandlish: (1 + φ/B0)/(1 + φ/B)
    assert lr_factor("mccandlish", 128, 32, reading) == pytest.approx((1 + 3 / 32) / (1 + 3 / 128))
    # pure noise: AdaScale → linear, McCandlish → B/B0; no noise: both → 1
    noisy = NoiseScale(1e-9, 1.0, 1e9, 0.0, 20)
    assert lr_factor("adascale", 128, 32, noisy) == pytest.approx(4.0, rel=1e-6)
    assert lr_factor("mccandlish", 128, 32, noisy) == pytest.approx(4.0, rel=1e-6)
    clean = NoiseScale(1.0, 1e-12, 1e-12, 0.0, 20)
    assert lr_factor("adascale", 128, 32, clean) == pytest.approx(1.0)
    # estimate-based rules wait for MIN_ESTIMATE_STEPS steps, and are 1 at B0
    young = NoiseScale(2.0, 6.0, 3.0, 0.1, 5)
    assert lr_factor("adascale", 128, 32, young) is None
    assert lr_factor("mccandlish", 32, 32, None) == 1.0


class RecordingSGD(torch.optim.SGD):
    """Records the lr each group holds while step() runs."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_linear_rule_ramps_and_leaves_the_user_scheduler_alone():
    # φ = 100 > max: the batch goes 8 -> 64 after step 10; linear factor 8
    c, model, opt = make(n=512, noise=FakeNoise(100.0), optimizer=RecordingSGD, lr=0.01,
                         warmup_steps=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    user_lrs = []
    train(c, model, c.run(max_steps=16),
          on_step=lambda: (user_lrs.append(opt.param_groups[0]["lr"]), sched.step()))
    factors = column(c, "lr_factor")
    assert factors[:10] == [1.0] * 10
    assert factors[10:14] == pytest.approx([1 + 7 * j / 4 for j in (1, 2, 3, 4)])
    assert factors[14:] == [8.0, 8.0]
    assert column(c, "batch_size") == [8] * 10 + [64] * 6
    # the scheduler's lr is restored after every step: it decays on its own schedule
    assert user_lrs == pytest.approx([0.01 * 0.5 ** (k // 3) for k in range(16)])
    # the optimizer ran with scheduler lr × factor, which the records report
    assert opt.seen == pytest.approx([u * f for u, f in zip(user_lrs, factors)])
    assert column(c, "lr") == pytest.approx(opt.seen)
    assert sched.get_last_lr()[0] == pytest.approx(0.01 * 0.5 ** (16 // 3))


@pytest.mark.parametrize("rule", ["sqrt", "adascale", "mccandlish", "none"])
def test_lr_rules_on_synthetic_readings(rule):
    phi = 40.0
    c, model, _ = make(n=512, noise=FakeNoise(phi), lr_rule=rule, warmup_steps=0, max_batch=32)
    train(c, model, c.run(max_steps=14))
    assert column(c, "batch_size")[10:] == [40 // 8 * 8 - 8] * 4   # 40 → clamp 32
    s = 32 / 8
    expected = {"sqrt": math.sqrt(s), "adascale": (phi + 1) / (phi / s + 1),
                "mccandlish": (1 + phi / 8) / (1 + phi / 32), "none": 1.0}[rule]
    assert column(c, "lr_factor")[:10] == [1.0] * 10
    assert column(c, "lr_factor")[10:] == pytest.approx([expected] * 4)


def test_estimate_rule_ramps_when_the_estimate_arrives_after_a_batch_change():
    # the schedule doubles the batch before the estimate has 10 steps: the
    # factor holds at 1, then ramps to the AdaScale gain once it is usable
    c, model, _ = make(n=512, noise=FakeNoise(30.0), policy="schedule", schedule=[(16, 16)],
                       lr_rule="adascale", warmup_steps=2)
    train(c, model, c.run(max_steps=13))
    gain = (30 + 1) / (30 / 2 + 1)
    assert column(c, "batch_size")[:3] == [8, 8, 16]
    f = column(c, "lr_factor")
    assert f[:9] == [1.0] * 9                   # the estimate is usable from step 10
    assert f[9:12] == pytest.approx([1 + (gain - 1) / 2, gain, gain])


# ------------------------------------------------------------------ policies
def test_limits_hysteresis_bounds_and_grow_only():
    lim = BatchLimits(min_batch=8, max_batch=256, unit=8, initial_batch=32, hysteresis=0.25)
    assert lim.round(43.9) == 40 and lim.round(44) == 48 and lim.round(1) == 8
    assert lim.accept(32, 39.0) == 32            # < 1.25 × 32
    assert lim.accept(32, 40.0) == 40
    assert lim.accept(32, 250.0) == 248
    assert lim.accept(32, 1e6) == 256            # clamped to max
    assert lim.accept(248, 260.0) == 256         # beyond max: taken despite h
    assert lim.accept(248, 255.0) == 248
    assert lim.accept(32, 1.0) == 32             # grow-only
    assert lim.accept(32, float("nan")) == 32
    lim.grow_only = False
    assert lim.accept(32, 26.0) == 32            # > 32 / 1.25
    assert lim.accept(32, 25.0) == 24
    assert lim.accept(16, 2.0) == 8


def test_critical_policy_waits_for_the_estimate_and_follows_it():
    phases = lambda step: 20.0 if step < 15 else 41.0   # noqa: E731
    c, model, _ = make(n=1024, noise=FakeNoise(phases), max_batch=64, warmup_steps=0)
    train(c, model, c.run(max_steps=20))
    nxt = column(c, "next_batch_size")
    # steps < 10: estimate too young; then 20 ≥ 1.25·8 → 24 (rounded to 8s)
    assert nxt[:9] == [8] * 9 and nxt[9] == 24
    # 41 ≥ 1.25·24 → 40 at step 15
    assert nxt[10:14] == [24] * 4 and nxt[14:] == [40] * 6


def test_critical_policy_hysteresis_factor_and_shrinking():
    c, model, _ = make(n=512, noise=FakeNoise(9.9), warmup_steps=0)
    train(c, model, c.run(max_steps=14))
    assert set(column(c, "batch_size")) == {8}          # 9.9 < 1.25 × 8
    c, model, _ = make(n=512, noise=FakeNoise(64.0), critical_factor=0.5, warmup_steps=0)
    train(c, model, c.run(max_steps=12))
    assert column(c, "batch_size")[-1] == 32
    drop = lambda step: 64.0 if step < 12 else 8.0      # noqa: E731
    for grow_only, last in ((True, 64), (False, 8)):
        c, model, _ = make(n=1024, noise=FakeNoise(drop), grow_only=grow_only, warmup_steps=0)
        train(c, model, c.run(max_steps=16))
        assert column(c, "batch_size")[10] == 64 and column(c, "batch_size")[-1] == last


def test_goodput_policy_known_optimum_and_prior():
    lim = BatchLimits(min_batch=8, max_batch=1024, unit=8, initial_batch=16)
    pol = GoodputPolicy()
    assert pol.fit() is None
    # one batch size measured: the prior splits its time in half, so
    # B* = sqrt(α φ/β) = sqrt(16 φ)
    pol.observe(16, 1.16)
    alpha, beta = pol.fit()
    assert alpha == pytest.approx(0.58) and beta == pytest.approx(0.58 / 16)
    assert pol.best(16, 400.0, lim) == 80
    # a second size too close to the first (an epoch's short last step) keeps the prior
    pol.observe(12, 0.87)
    assert pol.fit() == pytest.approx((0.5 * (1.16 + 0.87) / 2, 0.5 * (1.16 + 0.87) / 2 / 14))
    del pol.times[12]
    # exact times α = 1, β = 0.01 at two batch sizes: B* = sqrt(1·400/0.01) = 200
    for _ in range(3):
        pol.observe(64, 1.64)
    assert pol.fit() == pytest.approx((1.0, 0.01))
    reading = NoiseScale(1.0, 400.0, 400.0, 0.0, 12)
    assert pol.decide(16, reading, 0, lim) == 200
    g = [GoodputPolicy.goodput(b, 1.0, 0.01, 400.0, 16) for b in (192, 200, 208)]
    assert g[1] > g[0] and g[1] > g[2]
    # efficiency (φ + B0)/(φ + B) is 1 at B0
    assert GoodputPolicy.goodput(16, 1.0, 0.0, 400.0, 16) == pytest.approx(16.0)
    # bounds and grow-only
    assert pol.decide(16, reading, 0, BatchLimits(8, 128, 8, 16)) == 128
    assert pol.decide(256, reading, 0, lim) == 256
    lim.grow_only = False
    assert pol.decide(512, reading, 0, lim) == 200
    # a young estimate decides nothing
    assert pol.decide(16, NoiseScale(1.0, 400.0, 400.0, 0.0, 3), 0, lim) == 16
    # time that does not grow with B: the largest batch
    flat = GoodputPolicy()
    flat.observe(16, 1.0)
    flat.observe(32, 0.9)
    assert flat.fit() == (0.95, 0.0) and flat.best(16, 400.0, lim) == 1024
    restored = GoodputPolicy()
    restored.load_state_dict(pol.state_dict())
    assert restored.fit() == pol.fit()


def test_goodput_policy_in_the_loop():
    c, model, _ = make(n=1024, noise=FakeNoise(6400.0), policy="goodput", max_batch=128,
                       warmup_steps=0)
    train(c, model, c.run(max_steps=12))
    batches = column(c, "batch_size")
    assert batches[:10] == [8] * 10 and batches[10] > 8
    assert sum(n for n, _ in c.policy.times.values()) == 11     # first step not timed
    assert all(r["seconds"] > 0 for r in c.history)


def test_schedule_policy_list_and_ramp():
    c, model, _ = make(n=1000, noise=FakeNoise(1.0), policy="schedule",
                       schedule=[(0, 8), (40, 24), (200, 64)], warmup_steps=0)
    train(c, model, c.run(max_steps=12))
    assert column(c, "batch_size") == [8] * 5 + [24] * 7 and column(c, "samples")[-1] == 208
    assert column(c, "next_batch_size")[-1] == 64
    ramp = ramp_schedule(8, 32, 8, 96)            # +8 every 32 samples
    assert [ramp(s) for s in (0, 31, 32, 64, 95, 96, 10**6)] == [8, 8, 16, 24, 24, 32, 32]
    c, model, _ = make(n=1000, noise=FakeNoise(1.0), policy="schedule", schedule=ramp,
                       warmup_steps=0)
    train(c, model, c.run(max_steps=8))
    samples = [0] + column(c, "samples")
    assert column(c, "batch_size") == [max(8, ramp(s)) for s in samples[:-1]]
    assert SchedulePolicy([(10, 16)]).wanted(5) is None


# ------------------------------------------------------------ data accounting
def test_every_index_once_per_epoch_across_batch_changes():
    n = 100
    c, model, _ = make(n=n, noise=FakeNoise(1.0), policy="schedule",
                       schedule=[(0, 8), (40, 24), (150, 16)], warmup_steps=0)
    seen = train(c, model, c.epochs(3))
    assert c.epochs_completed == 3 and c.samples_seen == 3 * n
    steps = [(r["epoch"], r["batch_size"], r["accumulation"]) for r in c.history]
    flat = [i for mb in seen for i in mb]
    pos = 0
    per_epoch = {0: [], 1: [], 2: []}
    for epoch, size, _ in steps:
        per_epoch[epoch] += flat[pos:pos + size]
        pos += size
    for epoch, idx in per_epoch.items():
        assert sorted(idx) == list(range(n)), epoch
    # epoch 0: 5 × 8 = 40, then 24s: 88, the last step holds the 12 left
    assert [s for e, s, _ in steps if e == 0] == [8] * 5 + [24] * 2 + [12]
    # micro-batches never exceed micro_batch
    assert max(len(mb) for mb in seen) == 8
    # epochs are distinct permutations, reproducible from the seed
    assert per_epoch[0] != per_epoch[1]
    ref = EpochSampler(n, seed=0)
    assert ref.take(8)[1] == flat[:8]


def test_tail_too_small_to_measure_joins_the_last_step():
    sampler = EpochSampler(17, seed=3)
    sizes = []
    while sampler.epochs_completed < 1:
        sizes.append(len(sampler.take(8, min_step=2)[1]))
    assert sizes == [8, 9]                       # not 8, 8, 1
    # DDP shares: contiguous, ≤ 1 apart, same number of micro-batches everywhere
    plans = [plan_step(EpochSampler(23, seed=1), 23, 4, world_size=2, rank=r, min_step=4)
             for r in range(2)]
    assert plans[0].shares == [12, 11]
    assert plans[0].accumulation == plans[1].accumulation == 3
    assert plans[0].local_indices + plans[1].local_indices == plans[0].global_indices


def test_iteration_limits_and_one_epoch_iteration():
    c, model, _ = make(n=40, noise=FakeNoise(1.0))
    train(c, model)                              # iterating the controller: one epoch
    assert c.epochs_completed == 1 and c.steps == 5
    train(c, model, c.run(max_steps=7))
    assert c.steps == 7
    train(c, model, c.run(max_samples=70))
    assert c.samples_seen == 72
    train(c, model, c.epochs(3))                 # totals since the start
    assert c.epochs_completed == 3 and c.samples_seen == 120
    c2, model2, _ = make(n=40, noise=FakeNoise(1.0), max_steps=3)
    train(c2, model2)
    assert c2.steps == 3


def test_loop_misuse_is_reported():
    c, model, _ = make(n=64, noise=FakeNoise(1.0))
    with pytest.raises(RuntimeError, match="backward"):
        for x, y, _ in c:
            pass
    c, model, _ = make(n=64, noise=FakeNoise(1.0))
    with pytest.raises(RuntimeError, match="step"):
        for x, y, _ in c:
            c.backward(F.mse_loss(model(x), y))
    with pytest.raises(RuntimeError, match="in progress"):
        c.state_dict()


def test_leaving_the_loop_mid_step_resumes_the_step():
    c, model, _ = make(n=64, noise=FakeNoise(1.0), micro_batch=4, initial_batch=8)
    seen = []
    for x, y, idx in c:
        c.backward(F.mse_loss(model(x), y))
        seen.append(idx.tolist())
        break
    seen += train(c, model, c.run(max_steps=2))
    assert [len(s) for s in seen] == [4, 4, 4, 4]
    assert len({i for s in seen for i in s}) == 16 and c.steps == 2


# ----------------------------------------------------------- noise sources
def reference_noise_scale(n, B, steps, measured=lambda k: True):
    """GradientNoiseScale's reading of the batches the controller of `make`
    draws over `steps` steps (fixed model: lr = 0), fed only the steps k with
    measured(k)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ds = index_dataset(n)
    gns = GradientNoiseScale(model, source="per_sample")
    sampler = EpochSampler(n, seed=0)
    for k in range(steps):
        _, idx = sampler.take(B)
        if not measured(k):
            continue
        x, y, _ = ds[idx]
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        gns.step()
    return gns.read()


def test_per_sample_source_matches_gradient_noise_scale_with_accumulation():
    """The controller's per-sample source, with 1 and with 4 micro-batches per
    step, against GradientNoiseScale on the same batches (lr = 0: fixed model)."""
    n, B = 96, 16
    readings = []
    for micro in (16, 4):
        c, model, _ = make(n=n, lr=0.0, initial_batch=B, micro_batch=micro, max_batch=B,
                           lr_rule="none")
        assert c.noise_source == "per_sample"
        train(c, model, c.run(max_steps=6))
        readings.append(c.noise.read())
    ref = reference_noise_scale(n, B, steps=6)
    for r in readings:
        assert r.b_simple == pytest.approx(ref.b_simple, rel=1e-5)
        assert r.sq_norm == pytest.approx(ref.sq_norm, rel=1e-5)
        assert r.trace == pytest.approx(ref.trace, rel=1e-5)


def test_noise_interval_measures_one_step_in_k():
    """noise_interval=3: the estimate moves on steps 1, 4 and 7 of 9 and reads
    what GradientNoiseScale reads from those three steps' batches alone."""
    n, B = 96, 16
    c, model, _ = make(n=n, lr=0.0, initial_batch=B, micro_batch=B, max_batch=B,
                       lr_rule="none", noise_interval=3)
    assert c.noise_source == "per_sample" and c.noise.interval == 3
    moved = []
    train(c, model, c.run(max_steps=9), on_step=lambda: moved.append(c.noise.estimator.steps))
    assert moved == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    ref, got = reference_noise_scale(n, B, steps=9, measured=lambda k: k % 3 == 0), c.noise.read()
    assert got.steps == ref.steps == 3
    assert got.b_simple == pytest.approx(ref.b_simple, rel=1e-5)
    assert got.sq_norm == pytest.approx(ref.sq_norm, rel=1e-5)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_batchnorm_model_runs_on_the_micro_batch_source():
    with pytest.warns(RuntimeWarning, match="BatchNorm"):
        c, model, _ = make(n=256, model=BNNet(), initial_batch=16, micro_batch=16,
                           max_batch=64, warmup_steps=0)
    assert c.noise_source == "micro_batch" and "BatchNorm" in c.noise_source_reason
    seen = train(c, model, c.run(max_steps=12))
    # one micro-batch per step is run as two halves for the estimate
    assert column(c, "accumulation")[0] == 2 and len(seen[0]) == 8
    b = column(c, "b_simple")
    assert all(v is not None and math.isfinite(v) for v in b)
    with pytest.raises(ValueError, match="BatchNorm"):
        make(n=64, model=BNNet(), noise="per_sample", initial_batch=32, micro_batch=32)


class Scale(nn.Module):
    """A module with parameters and no norm rule, measured from its calls."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


class TiedToSibling(nn.Module):
    """Uses the weight of a Linear beside it, with no rule: the tracker's slow fallback."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x):
        return x @ self.weight.t()


def test_auto_source_avoids_the_tracker_fallback_and_rejects_misfits():
    c, model, _ = make(n=64, model=nn.Sequential(Scale(3), nn.Linear(3, 1)))
    assert c.noise_source == "per_sample"
    train(c, model, c.run(max_steps=2))
    first = nn.Linear(3, 3)
    c, model, _ = make(n=64, model=nn.Sequential(first, TiedToSibling(first), nn.Linear(3, 1)))
    assert c.noise_source == "micro_batch" and "fallback" in c.noise_source_reason
    train(c, model, c.run(max_steps=2))
    model = nn.Linear(3, 1)
    c, model, _ = make(n=64, model=model, noise=GradientNoiseScale(model, source="per_sample"))
    assert c.noise_source == "per_sample"
    train(c, model, c.run(max_steps=3))
    with pytest.raises(ValueError, match="lacks"):
        make(n=64, model=model, noise=object())


def test_grad_scaler_gives_the_same_training():
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        c, model, _ = make(n=256, scaler=scaler, micro_batch=4, warmup_steps=2)
        train(c, model, c.run(max_steps=14))
        runs.append((column(c, "b_simple"), column(c, "batch_size"),
                     torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert runs[0][1] == runs[1][1]
    # steps before the first estimate carry no B_simple: they must be the same steps
    unmeasured = [[b is None for b in run[0]] for run in runs]
    assert unmeasured[0] == unmeasured[1] and not all(unmeasured[0])
    measured = [[b for b in run[0] if b is not None] for run in runs]
    assert measured[0] == pytest.approx(measured[1], rel=1e-4)
    torch.testing.assert_close(runs[0][2], runs[1][2], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ bad configuration
class _Stream(IterableDataset):
    def __iter__(self):
        return iter([])


@pytest.mark.parametrize("kw, exc, match", [
    ({"min_batch": 32, "max_batch": 16}, ValueError, "`max_batch`=16 is smaller than `min_batch`"),
    ({"initial_batch": 128}, ValueError, "`initial_batch`=128 is outside"),
    ({"min_batch": 16, "initial_batch": 8}, ValueError, "`initial_batch`=8 is outside"),
    ({"initial_batch": 12}, ValueError, "`initial_batch`=12 is not a multiple of micro_batch"),
    ({"max_batch": 60}, ValueError, "`max_batch`=60 is not a multiple.*use 56 or 64"),
    ({"initial_batch": 0}, ValueError, "`initial_batch` must be a positive integer"),
    ({"lr_rule": "cubic"}, ValueError, "unknown `lr_rule` 'cubic'"),
    ({"policy": "greedy"}, ValueError, "unknown `policy` 'greedy'"),
    ({"policy": "schedule"}, ValueError, "policy='schedule' needs `schedule`"),
    ({"schedule": [(0, 8)]}, ValueError, "`schedule` is only used with policy='schedule'"),
    ({"policy": "schedule", "schedule": [(10, 8), (5, 16)]}, ValueError,
     "thresholds must increase"),
    ({"noise": "replicas"}, ValueError, "unknown `noise_source` 'replicas'"),
    ({"noise": "distributed"}, ValueError, "noise_source='distributed' needs"),
    ({"log_path": "log.txt"}, ValueError, "`log_path` must end in .csv or .jsonl"),
    ({"warmup_steps": -1}, ValueError, "`warmup_steps`"),
    ({"hysteresis": -0.1}, ValueError, "`hysteresis`"),
    ({"critical_factor": 0}, ValueError, "`critical_factor`"),
    ({"beta": 1.0}, ValueError, "`beta`"),
    ({"noise_interval": 0}, ValueError, "`noise_interval` must be a positive integer"),
    ({"n": 1}, ValueError, "the dataset has 1 samples"),
])
def test_bad_configuration_is_rejected(kw, exc, match):
    with pytest.raises(exc, match=match):
        make(**kw)


def test_bad_data_is_rejected():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="map-style"):
        AdaptiveBatch(model, opt, _Stream(), initial_batch=8, max_batch=8, micro_batch=8)
    with pytest.raises(TypeError, match="optimizer"):
        AdaptiveBatch(model, None, index_dataset(8), initial_batch=8, max_batch=8, micro_batch=8)


def test_dataloader_contributes_only_dataset_and_collate_fn():
    ds = index_dataset(64)

    def collate(items):
        x, y, i = zip(*items)
        return {"x": torch.stack(x), "y": torch.stack(y), "i": torch.stack(i)}

    loader = DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate)
    model = nn.Linear(3, 1)
    c = AdaptiveBatch(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                      initial_batch=8, max_batch=8, micro_batch=8, noise_source=FakeNoise(1.0))
    for batch in c.run(max_steps=2):
        assert set(batch) == {"x", "y", "i"} and batch["x"].shape == (8, 3)
        c.backward(F.mse_loss(model(batch["x"]), batch["y"]))
        c.step()
    assert c.steps == 2


# ------------------------------------------------------------ memory probe
def test_memory_probe_counts_saved_activations_and_static_memory():
    d, h, o = 10, 24, 3
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, o))
    before = [p.detach().clone() for p in mlp.parameters()]
    P = sum(p.numel() for p in mlp.parameters())
    for opt, state_bytes in ((torch.optim.Adam(mlp.parameters()), 2 * 4 * P + 4 * 4),
                             (torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9), 4 * P),
                             (torch.optim.SGD(mlp.parameters(), lr=0.1), 0)):
        micro, per_sample, static = probe_micro_batch(
            mlp, lambda n: (torch.randn(n, d), torch.randn(n, o)), opt, memory_budget=100_000)
        # saved for backward: the input x (d floats) and the ReLU output
        # (h floats, saved by ReLU and by the second Linear: one storage)
        assert per_sample == 4 * (d + h)
        assert static == 4 * P + 4 * P + state_bytes        # params + grads + state
        assert micro == (100_000 - static) // per_sample
        assert not opt.state
    # the model was left alone
    assert all(p.grad is None for p in mlp.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters()))
    with pytest.raises(ValueError, match="memory_budget"):
        probe_micro_batch(mlp, lambda n: (torch.randn(n, d),), None, memory_budget=1000)
    assert default_memory_budget() > 0


def test_controller_probes_the_micro_batch_when_not_given():
    d = 3
    # Linear(3, 1) saves its input: 12 bytes a sample; static: 4 params +
    # 4 grads (SGD keeps no state) = 32 bytes. Budget for 5 samples.
    c, model, _ = make(n=64, d=d, micro_batch=None, memory_budget=32 + 5 * 12,
                       initial_batch=16, max_batch=70, noise=FakeNoise(1.0))
    assert (c.bytes_per_sample, c.static_bytes) == (12, 32)
    assert c.micro_batch == 4                     # largest divisor of 16 that is ≤ 5
    assert c.limits.max_batch == 68 and c.limits.min_batch == 4
    train(c, model, c.run(max_steps=2))
    assert column(c, "accumulation") == [4, 4]


# ------------------------------------------------------------------ records
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_records_go_to_history_and_log_file(tmp_path, suffix):
    path = tmp_path / f"log{suffix}"
    c, model, _ = make(n=128, noise=FakeNoise(30.0), log_path=path)
    train(c, model, c.run(max_steps=4))
    state = c.state_dict()
    train(c, model, c.run(max_steps=6))
    c.close()
    assert all(set(r) == set(RECORD_FIELDS) for r in c.history)
    if suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == list(RECORD_FIELDS)
        assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
        assert float(rows[2]["loss"]) == c.history[2]["loss"]
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows == c.history
    # a resumed controller drops what was logged after its checkpoint
    c2, _, _ = make(n=128, noise=FakeNoise(30.0), log_path=path)
    c2.load_state_dict(state)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 + (suffix == ".csv")
    assert c2.history == [] and c2.state_dict()["history_len"] == 4


def test_tensorboard_missing_is_said_and_present_is_used(tmp_path, monkeypatch):
    try:
        import tensorboard  # noqa: F401
        have_tb = True
    except ImportError:
        have_tb = False
    if not have_tb:
        with pytest.warns(RuntimeWarning, match="TensorBoard is not installed"):
            c, _, _ = make(n=64, noise=FakeNoise(1.0), tensorboard_dir=tmp_path)
        assert c._records.tensorboard is None
    written = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    c, model, _ = make(n=64, noise=FakeNoise(1.0), tensorboard_dir=tmp_path)
    train(c, model, c.run(max_steps=2))
    tags = {t for t, _, _ in written}
    assert {"gradnoise/batch_size", "gradnoise/lr", "gradnoise/loss"} <= tags
    assert ("gradnoise/batch_size", 8.0, 2) in written


# ------------------------------------------------------- bitwise resumption
def resume_setup(log_path=None):
    """A run whose batch grows from the measured noise scale, with a ramp
    (acting on the point estimate: a run this short never narrows its
    interval enough to grow on the lower bound)."""
    n, d = 160, 6
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=gen)
    y = x @ torch.randn(d, 1, generator=gen) + 3.0 * torch.randn(n, 1, generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    c = AdaptiveBatch(model, opt, TensorDataset(x, y), initial_batch=4, micro_batch=4,
                      max_batch=48, warmup_steps=5, beta=0.8, log_path=log_path, confidence=0.0)
    return c, model, opt, sched


def resume_trajectory(c, model, sched, stop):
    for x, y in c.run(max_steps=stop):
        c.backward(F.mse_loss(model(x), y))
        if c.step():
            sched.step()
    keys = ("step", "samples", "epoch", "loss", "b_simple", "batch_size", "accumulation", "lr",
            "lr_factor")
    params = [p.detach().double().flatten().tolist() for p in model.parameters()]
    return {"records": [[r[k] for k in keys] for r in c.history], "params": params}


RESUME_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from tests.test_adaptive import resume_setup, resume_trajectory
path, stop = sys.argv[1], int(sys.argv[2])
c, model, opt, sched = resume_setup()
state = torch.load(path, weights_only=False)
model.load_state_dict(state["model"])
opt.load_state_dict(state["opt"])
sched.load_state_dict(state["sched"])
c.load_state_dict(state["controller"])
print(json.dumps(resume_trajectory(c, model, sched, stop)))
"""


def test_resume_in_a_new_process_follows_the_same_trajectory(tmp_path):
    N, STOP = 14, 30
    c, model, opt, sched = resume_setup()
    straight = resume_trajectory(c, model, sched, STOP)
    batches = [r[5] for r in straight["records"]]
    factors = [r[8] for r in straight["records"]]
    # the window after the checkpoint has a batch change and a ramp in it
    assert len(set(batches[N:])) > 1 and len(set(factors[N:])) > 2, (batches, factors)
    assert 1 < len({r[2] for r in straight["records"]})        # crosses an epoch

    c, model, opt, sched = resume_setup()
    resume_trajectory(c, model, sched, N)
    state = tmp_path / "state.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "controller": c.state_dict()}, state)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(state), str(STOP)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = json.loads(json.dumps({"records": straight["records"][N:],
                                      "params": straight["params"]}))
    assert resumed == expected
