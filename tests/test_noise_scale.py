"""The noise-scale estimators and GradientNoiseScale against closed forms."""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradnoise import GradNoiseTracker
from gradnoise.estimators import (BiasCorrectedEMA, NoiseScaleEstimator, per_sample_estimates,
                                  unbiased_sq_norm_and_trace)
from gradnoise.noise_scale import GradientNoiseScale
from tests.helpers import DELTA_SQ, TRUE_B_SIMPLE, loss_fn, regression_batch, regression_model

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- estimators
def test_two_batch_estimates_are_unbiased_on_synthetic_gradients():
    """Per-sample gradients g ~ N(G, Σ) with known G and Σ."""
    gen = torch.Generator().manual_seed(0)
    d, b, B, trials = 6, 4, 32, 20000
    G = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    cov = A @ A.T / d
    L = torch.linalg.cholesky(cov)
    samples = G + torch.randn(trials, B, d, generator=gen, dtype=torch.float64) @ L.T
    small = samples[:, :b].mean(1).square().sum(1)
    big = samples.mean(1).square().sum(1)
    g2, tr = unbiased_sq_norm_and_trace(small, big, b, B)
    assert abs(g2.mean().item() - G.square().sum().item()) < 0.02 * G.square().sum().item()
    assert abs(tr.mean().item() - cov.trace().item()) < 0.02 * cov.trace().item()
    # single-step estimates of ‖G‖² do go negative when the noise dominates
    g2_noisy, _ = unbiased_sq_norm_and_trace(small * 50, big, b, B)
    assert (g2_noisy < 0).any()


def test_bias_corrected_ema():
    ema = BiasCorrectedEMA(0.9)
    assert ema.value is None
    ema.update(5.0)
    assert ema.value == pytest.approx(5.0)
    ema.update(5.0)
    assert ema.value == pytest.approx(5.0)
    with pytest.raises(ValueError, match="beta"):
        BiasCorrectedEMA(1.0)


def test_ratio_taken_after_smoothing_and_undefined_when_sq_norm_not_positive():
    est = NoiseScaleEstimator(beta=0.5)
    assert est.read().b_simple is None
    est.update(-1.0, 3.0)  # a single negative ‖G‖² estimate
    r = est.read()
    assert r.b_simple is None and r.sq_norm == -1.0
    est.update(3.0, 3.0)
    r = est.read()
    assert r.b_simple == pytest.approx(r.trace / r.sq_norm)
    zero = NoiseScaleEstimator()
    for _ in range(5):
        zero.update(0.0, 0.0)
    r = zero.read()
    assert r.b_simple is None and r.stderr is None
    assert all(math.isfinite(v) for v in (r.sq_norm, r.trace))
    assert all(math.isfinite(v) for v in pickle.loads(pickle.dumps(zero.state_dict()))["trace"].values())


def test_interval_coverage():
    """The 95% interval of B_simple covers the truth in about 95% of runs."""
    gen = torch.Generator().manual_seed(1)
    d, B, steps, runs = 4, 16, 200, 300
    G = torch.tensor([1.0, 0.5, -0.5, 0.2], dtype=torch.float64)
    truth = d * 1.0 / G.square().sum().item()  # Σ = I
    covered = 0
    for _ in range(runs):
        est = NoiseScaleEstimator(beta=0.95)
        g = G + torch.randn(steps, B, d, generator=gen, dtype=torch.float64)
        small = g.square().sum(2).mean(1)
        big = g.mean(1).square().sum(1)
        g2, tr = unbiased_sq_norm_and_trace(small, big, 1, B)
        for a, s in zip(g2.tolist(), tr.tolist()):
            est.update(a, s)
        lo, hi = est.read().interval()
        covered += lo <= truth <= hi
    # ±3 standard errors of a 95% coverage over 300 runs
    assert 0.91 <= covered / runs <= 0.99, covered / runs


# ---------------------------------------------- closed form: linear regression
@pytest.mark.parametrize("source", ["per_sample", "micro_batch"])
def test_closed_form_linear_regression(source):
    model, w_star = regression_model()
    gen = torch.Generator().manual_seed(2)
    gns = GradientNoiseScale(model, source=source, beta=0.995)
    B, k = 64, 4
    for _ in range(1500):
        model.zero_grad()
        x, y = regression_batch(gen, B, w_star)
        if source == "per_sample":
            loss_fn(model, x, y).backward()
        else:
            for xs, ys in zip(x.chunk(k), y.chunk(k)):
                (loss_fn(model, xs, ys) / k).backward()
        gns.step(B)
    r = gns.read()
    assert r.b_simple == pytest.approx(TRUE_B_SIMPLE, rel=0.05)
    assert r.sq_norm == pytest.approx(DELTA_SQ, rel=0.1)
    lo, hi = r.interval()
    assert lo < r.b_simple < hi


def test_loss_scaling_does_not_change_b_simple():
    """sum vs mean losses and a constant loss scale give the same B_simple."""
    results = []
    for reduction, scale in (("mean", 1.0), ("sum", 1.0), ("mean", 1024.0)):
        model, w_star = regression_model()
        gen = torch.Generator().manual_seed(3)
        gns = GradientNoiseScale(model, source="micro_batch", loss_reduction=reduction)
        for _ in range(20):
            model.zero_grad()
            x, y = regression_batch(gen, 32, w_star)
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                (loss_fn(model, xs, ys, reduction) * scale).backward()
            gns.step(32)
        results.append(gns.read().b_simple)
    assert results[1] == pytest.approx(results[0], rel=1e-9)
    assert results[2] == pytest.approx(results[0], rel=1e-9)


@pytest.mark.parametrize("source", ["per_sample", "micro_batch"])
def test_interval_measures_one_step_in_k_and_the_rest_cost_nothing(source):
    """interval=3 over 9 steps reads exactly what interval=1 reads over steps
    0, 3 and 6; between them the owned tracker is paused (untracked steps) and
    the hooks do nothing; the counter survives state_dict."""
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(12, 5, generator=gen), torch.randn(12, 2, generator=gen))
               for _ in range(9)]

    def run(interval, steps):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
        gns = GradientNoiseScale(model, source=source, per_layer=True, interval=interval)
        readings = []
        for t in steps:
            x, y = batches[t]
            model.zero_grad()
            if source == "per_sample":
                assert gns.tracker.paused == (not gns.measuring)
                (model(x) - y).square().mean().backward()
            else:
                for xs, ys in zip(x.chunk(2), y.chunk(2)):
                    ((model(xs) - ys).square().mean() / 2).backward()
                if not gns.measuring:
                    assert gns._source.backwards == []       # the hooks did nothing
            readings.append(gns.step(12))
        return gns, readings

    every3, r3 = run(3, range(9))
    every1, r1 = run(1, [0, 3, 6])
    assert [r is None for r in r3] == [t % 3 != 0 for t in range(9)]
    assert [r.b_simple for r in r3 if r is not None] == [r.b_simple for r in r1]
    assert every3.read() == every1.read()
    assert every3.read_layers() == every1.read_layers()
    assert every3.steps_seen == 9 and every3.read().steps == 3
    state = every3.state_dict()
    torch.manual_seed(0)
    fresh = GradientNoiseScale(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)),
                               source=source, interval=3)
    fresh.steps_seen = 4
    fresh.load_state_dict(state)
    assert fresh.steps_seen == 9 and fresh.measuring
    if source == "per_sample":
        assert not fresh.tracker.paused
    with pytest.raises(ValueError, match="interval"):
        GradientNoiseScale(nn.Linear(2, 2), source=source, interval=0)


def test_per_layer_estimates_and_non_finite_steps_are_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    gns = GradientNoiseScale(model, source="per_sample", per_layer=True)
    for step in range(6):
        model.zero_grad()
        x = torch.randn(16, 5)
        if step == 3:
            x[0, 0] = float("nan")
        model(x).square().mean().backward()
        out = gns.step()
        assert (out is None) == (step == 3)
    assert gns.skipped_steps == 1 and gns.read().steps == 5
    assert set(gns.read_layers()) == {"0", "2"}
    assert math.isfinite(gns.read().b_simple)


def test_batch_gradient_norms_read_every_gradient_as_it_is_at_step():
    """‖G_B‖² per layer is read from .grad at step(), whatever happened to it
    (accumulation, in-place changes, a new tensor), for dense, sparse and
    half-precision gradients; the time spent is reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 300, sparse=True), nn.Linear(300, 400), nn.ReLU(),
                          nn.Linear(400, 3))
    gns = GradientNoiseScale(model, source="micro_batch")
    idx = torch.randint(0, 50, (8,))

    def backward():
        model(idx).square().mean().backward()

    def check():
        truth = {}
        for name, m in model.named_children():
            for p in m.parameters():
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                truth[name] = truth.get(name, 0.0) + g.double().square().sum().item()
        got = gns._grads.per_layer()
        assert got.keys() == truth.keys()
        for k in truth:
            assert got[k] == pytest.approx(truth[k], rel=1e-6), k

    backward()
    check()
    backward()                                           # accumulates into .grad
    check()
    model[1].weight.grad.mul_(3.0)                       # e.g. GradScaler.unscale_, clipping
    check()
    model[1].weight.grad = torch.randn_like(model[1].weight)
    check()
    assert 0 < gns.overhead_seconds < 60
    half = nn.Linear(300, 400).half()                    # a half-precision model's gradients
    gns_half = GradientNoiseScale(half, source="micro_batch")
    half(torch.randn(4, 300).half()).float().square().mean().backward()
    truth = sum(p.grad.double().square().sum().item() for p in half.parameters())
    assert gns_half._grads.per_layer()[""] == pytest.approx(truth, rel=1e-6)


def test_micro_batch_source_needs_two_backwards():
    model, w_star = regression_model()
    gns = GradientNoiseScale(model, source="micro_batch")
    x, y = regression_batch(torch.Generator().manual_seed(0), 8, w_star)
    loss_fn(model, x, y).backward()
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        gns.step(8)


def test_bad_configuration():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="source"):
        GradientNoiseScale(model, source="replicas")
    with pytest.raises(RuntimeError, match="init_process_group"):
        GradientNoiseScale(model, source="distributed")


def test_first_step_has_no_standard_error():
    for beta in (0.5, 0.9, 0.95, 0.99, 0.995, 0.999):
        est = NoiseScaleEstimator(beta)
        est.update(1.3, 17.0)
        r = est.read()
        assert r.b_simple == pytest.approx(17.0 / 1.3) and r.stderr is None and r.interval() is None
        est.update(1.1, 19.0)
        assert est.read().stderr is not None


def _closed_form_run(source, sizes, weighting, steps=6000, reduction="mean"):
    """Linear regression with fresh batches split into micro-batches of
    `sizes`, each backward's loss weighted as `weighting` says ("1/k" or
    "b/N" on a mean, "1" on a sum), every backward declared."""
    model, w_star = regression_model()
    gen = torch.Generator().manual_seed(4)
    gns = GradientNoiseScale(model, source=source, beta=0.9995, loss_reduction=reduction)
    N, k = sum(sizes), len(sizes)
    for _ in range(steps):
        model.zero_grad()
        x, y = regression_batch(gen, N, w_star)
        for xs, ys in zip(x.split(sizes), y.split(sizes)):
            c = {"1/k": 1.0 / k, "b/N": xs.shape[0] / N, "1": 1.0}[weighting]
            (loss_fn(model, xs, ys, reduction) * c).backward()
            gns.after_backward(c, xs.shape[0])
        gns.step(N)
    return gns.read()


@pytest.mark.parametrize("source,weighting,reduction", [
    ("micro_batch", "1/k", "mean"), ("micro_batch", "b/N", "mean"),
    ("per_sample", "1/k", "mean"), ("per_sample", "1", "sum")])
def test_uneven_micro_batches_keep_the_closed_form(source, weighting, reduction):
    """Micro-batches of 16, 16, 16 and 4 samples, however weighted: each
    backward's own size and weight enter the estimates (B_eff), so B_simple,
    ‖G‖² and tr(Σ) stay unbiased."""
    r = _closed_form_run(source, [16, 16, 16, 4], weighting, reduction=reduction)
    assert r.b_simple == pytest.approx(TRUE_B_SIMPLE, rel=0.05)
    assert abs(r.b_simple - TRUE_B_SIMPLE) < 3 * r.stderr
    assert r.sq_norm == pytest.approx(DELTA_SQ, rel=0.1)
    assert r.trace == pytest.approx(TRUE_B_SIMPLE * DELTA_SQ, rel=0.1)


def _one_step(source, parts, reduction="mean", declare=True, scaler=None, before=None):
    """Single-step (beta=0) values of a step over `parts`, each backward's
    loss the mean (or sum) over its part times b_j/N (times 1 for a sum)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gns = GradientNoiseScale(model, source=source, beta=0.0, loss_reduction=reduction,
                             scaler=scaler)
    N = sum(x.shape[0] for x, _ in parts)
    for x, y in parts:
        c = x.shape[0] / N if reduction == "mean" else 1.0
        loss = (model(x) - y).square().sum(1)
        loss = (loss.mean() if reduction == "mean" else loss.sum()) * c
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if declare:
            gns.after_backward(c, x.shape[0])
    if before is not None:
        before(model)
    r = gns.step(N)
    return r.sq_norm, r.trace


def _parts(sizes, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=gen, dtype=torch.float64),
             torch.randn(n, 2, generator=gen, dtype=torch.float64)) for n in sizes]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_accumulation_equals_one_backward(reduction):
    """The per-sample source over 2 or 3 backward passes (uneven, weighted
    b_j/N, or sums) reads what one backward of the whole batch reads, in the
    mean loss's units."""
    whole = _one_step("per_sample", _parts([16]), reduction)
    for sizes in ([8, 8], [11, 5], [2, 9, 5]):
        parts = _parts([16])
        x, y = parts[0]
        split = list(zip(x.split(sizes), y.split(sizes)))
        assert _one_step("per_sample", split, reduction) == pytest.approx(whole, rel=1e-9)
    if reduction == "sum":
        assert _one_step("per_sample", _parts([16]), "mean") == pytest.approx(whole, rel=1e-9)


def test_sum_losses_are_reported_in_mean_loss_units():
    """micro_batch: sums over micro-batches (weight 1) give the ‖G‖² and tr(Σ)
    of the mean loss, as weighted means do."""
    parts = _parts([6, 6, 6])
    assert _one_step("micro_batch", parts, "sum") == pytest.approx(
        _one_step("micro_batch", parts, "mean"), rel=1e-9)
    # undeclared backward passes: an even split, 1/k on means and 1 on sums
    assert _one_step("micro_batch", parts, "sum", declare=False) == pytest.approx(
        _one_step("micro_batch", parts, "mean"), rel=1e-9)


def test_grad_scaler_is_undone_before_or_after_unscale():
    plain = {s: _one_step(s, _parts([8, 8])) for s in ("per_sample", "micro_batch")}
    for source in plain:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        assert _one_step(source, _parts([8, 8]), scaler=scaler) == pytest.approx(
            plain[source], rel=1e-9)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

        def unscale(model, scaler=scaler):
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            scaler.unscale_(opt)

        assert _one_step(source, _parts([8, 8]), scaler=scaler, before=unscale) == pytest.approx(
            plain[source], rel=1e-9)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

        def stepped(model, scaler=scaler):
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            scaler.step(opt)

        with pytest.raises(RuntimeError, match="before scaler.step"):
            _one_step(source, _parts([8, 8]), scaler=scaler, before=stepped)


def test_steps_that_cannot_be_measured_raise():
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    for source in ("per_sample", "micro_batch"):
        gns = GradientNoiseScale(model, source=source)
        for xs in x.chunk(2):
            (model(xs).square().mean() / 2).backward()
            if source == "per_sample":
                gns.after_backward(0.5)
        model.zero_grad()
        with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
            gns.step(8)
        gns.close()
    # two backward passes of the per-sample source, not declared
    gns = GradientNoiseScale(model, source="per_sample")
    for xs in x.chunk(2):
        (model(xs).square().mean() / 2).backward()
    with pytest.raises(ValueError, match="after_backward"):
        gns.step(8)
    gns.close()
    # micro-batches that cannot be an even split of batch_size
    gns = GradientNoiseScale(model, source="micro_batch")
    for xs in x.split([5, 3]):
        (model(xs).square().mean() / 2).backward()
    with pytest.raises(ValueError, match="after_backward"):
        gns.step(9)
    # declared sizes that disagree with batch_size
    for xs in x.split([5, 3]):
        (model(xs).square().mean() / 2).backward()
        gns.after_backward(0.5, xs.shape[0])
    with pytest.raises(ValueError, match="batch_size=9"):
        gns.step(9)


def test_misuse_gets_errors_that_name_the_argument():
    model = nn.Linear(3, 1)
    cases = [
        (dict(model="net"), TypeError, "model"),
        (dict(model=model, beta="0.9"), ValueError, "beta"),
        (dict(model=model, beta=1.0), ValueError, "beta"),
        (dict(model=model, scaler=2.0), TypeError, "scaler"),
        (dict(model=model, tracker="yes"), TypeError, "tracker"),
        (dict(model=model, source="micro_batch", tracker=GradNoiseTracker(nn.Linear(3, 1))),
         ValueError, "tracker"),
        (dict(model=model, tracker=GradNoiseTracker(nn.Linear(3, 1))), ValueError, "another model"),
        (dict(model=model, tracker=GradNoiseTracker(model, loss_reduction="sum")), ValueError,
         "loss_reduction"),
        (dict(model=nn.Linear(3, 1).requires_grad_(False)), ValueError, "no trainable"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            GradientNoiseScale(**kwargs)
    gns = GradientNoiseScale(model, source="micro_batch")
    for bad in (0, -1, float("nan"), True, "8"):
        with pytest.raises(ValueError, match="batch_size"):
            gns.step(bad)
    model(torch.randn(4, 3)).sum().backward()
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="loss_scale"):
            gns.after_backward(bad)
    with pytest.raises(ValueError, match="state_dict"):
        gns.load_state_dict({})


RESUME_SCRIPT = r"""
import pickle, sys, torch
sys.path.insert(0, {root!r})
from tests.helpers import regression_model, regression_batch, loss_fn
from gradnoise.noise_scale import GradientNoiseScale
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, w_star = regression_model()
gns = GradientNoiseScale(model, source="per_sample", per_layer=True)
gen = torch.Generator().manual_seed(5)
start = 0
if mode == "resume":
    with open(path, "rb") as f:
        state = pickle.load(f)
    gns.load_state_dict(state["gns"])
    gen.set_state(state["gen"])
    start = n
for _ in range(start, n if mode == "first" else 2 * n):
    model.zero_grad()
    x, y = regression_batch(gen, 16, w_star)
    loss_fn(model, x, y).backward()
    gns.step()
if mode == "first":
    with open(path, "wb") as f:
        pickle.dump({{"gns": gns.state_dict(), "gen": gen.get_state()}}, f)
else:
    print(repr(gns.read()))
"""


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(root=str(ROOT)))
    state = tmp_path / "state.pkl"

    def run(*args):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    n = 15
    run("first", str(state), str(n))
    resumed = run("resume", str(state), str(n))
    straight = run("straight", str(state), str(n))
    assert resumed == straight and "b_simple" in resumed


def test_hessian_noise_scale_on_linear_regression():
    """H = E[xxᵀ] = I for x ~ N(0, I): B_noise = B_simple and ε_max = 1,
    up to the sampling error of a finite batch (H estimated on 4096 samples)."""
    from gradnoise.hessian import hessian_noise_scale

    model, w_star = regression_model()
    x, y = regression_batch(torch.Generator().manual_seed(9), 4096, w_star)

    def mse(out, t):
        return 0.5 * (out - t).square().mean()

    est = hessian_noise_scale(model, mse, x, y, samples=600)
    assert est.eps_max == pytest.approx(1.0, rel=0.1)
    assert est.b_noise == pytest.approx(TRUE_B_SIMPLE, rel=0.15)


def test_hessian_noise_scale_equals_its_closed_form_on_the_same_batch():
    """Linear regression, loss ½·mean (x·w − y)²: H = XᵀX/N, g_i = (x_i·w − y_i) x_i,
    computed here by hand on the very batch the estimator sees."""
    from gradnoise.hessian import hessian_noise_scale

    model, w_star = regression_model()
    x, y = regression_batch(torch.Generator().manual_seed(6), 64, w_star)
    n = 10
    est = hessian_noise_scale(model, lambda out, t: 0.5 * (out - t).square().mean(), x, y,
                              samples=n)
    w = model.weight.detach()[0]
    g = (x @ w - y[:, 0])[:, None] * x                    # per-sample gradients
    H = x.T @ x / x.shape[0]
    G = g.mean(0)
    c = g[:n] - g[:n].mean(0)
    tr_h_sigma = torch.einsum("ia,ab,ib->", c, H, c).item() / (n - 1)
    g_h_g = (G @ H @ G).item()
    assert est.g_h_g == pytest.approx(g_h_g, rel=1e-10)
    assert est.trace_h_sigma == pytest.approx(tr_h_sigma, rel=1e-10)
    assert est.b_noise == pytest.approx(tr_h_sigma / g_h_g, rel=1e-10)
    assert est.eps_max == pytest.approx(G.square().sum().item() / g_h_g, rel=1e-10)


def test_a_failed_backward_or_step_leaves_the_next_step_whole():
    class FailOnce(torch.autograd.Function):
        fail = True

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if FailOnce.fail:
                FailOnce.fail = False
                raise RuntimeError("fails once")
            return g

    torch.manual_seed(0)
    first, second = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    model = nn.Sequential(first, second)
    parts = _parts([4, 4])

    def micro_step(gns, fn=lambda h: h):
        model.zero_grad()
        for x, y in parts:
            ((second(fn(first(x))) - y).square().sum(1).mean() / 2).backward()
        return gns.step(8)

    reference = micro_step(GradientNoiseScale(model, source="micro_batch", beta=0.0))
    gns = GradientNoiseScale(model, source="micro_batch", beta=0.0)
    with pytest.raises(RuntimeError, match="fails once"):
        micro_step(gns, FailOnce.apply)                   # the loop skips this step
    after = micro_step(gns)
    assert (after.sq_norm, after.trace) == pytest.approx((reference.sq_norm, reference.trace),
                                                         rel=1e-12)
    # per-sample: a step refused for a wrong batch_size adds nothing to the next
    ps = GradientNoiseScale(model, source="per_sample", beta=0.0)
    x, y = _parts([8])[0]
    ((model(x) - y).square().sum(1).mean()).backward()
    with pytest.raises(ValueError, match="batch_size=9"):
        ps.step(9)
    model.zero_grad()
    fresh = GradientNoiseScale(model, source="per_sample", beta=0.0)
    ((model(x) - y).square().sum(1).mean()).backward()
    got = ps.step(8)
    assert (got.sq_norm, got.trace) == pytest.approx((fresh.step(8).sq_norm, fresh.read().trace),
                                                     rel=1e-12)


def test_undeclared_per_sample_accumulation_is_refused_without_batch_size():
    model = nn.Linear(3, 1)
    gns = GradientNoiseScale(model, source="per_sample")
    for xs in torch.randn(8, 3).chunk(2):
        (model(xs).square().mean() / 2).backward()
    with pytest.raises(ValueError, match="2 backward passes"):
        gns.step()


def test_grad_scaler_serving_two_optimizers():
    torch.manual_seed(0)
    model, other = nn.Linear(3, 2).double(), nn.Linear(3, 1).double()
    x, y = _parts([16])[0]

    def run(action, optimizer):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        opt, opt_other = (torch.optim.SGD(m.parameters(), lr=0.0) for m in (model, other))
        gns = GradientNoiseScale(model, source="micro_batch", beta=0.0, scaler=scaler,
                                 optimizer=opt if optimizer else None)
        model.zero_grad()
        other.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            scaler.scale((model(xs) - ys).square().sum(1).mean() / 2 + other(xs).sum()).backward()
        if action == "unscale other":
            scaler.unscale_(opt_other)
        elif action == "step other":
            scaler.step(opt_other)
        elif action == "unscale own":
            scaler.unscale_(opt)
        elif action == "step other, unscale own":
            scaler.step(opt_other)
            scaler.unscale_(opt)
        r = gns.step(16)
        gns.close()
        return r.sq_norm, r.trace

    expected = run(None, True)
    for action in ("unscale other", "step other", "unscale own", "step other, unscale own"):
        assert run(action, True) == pytest.approx(expected, rel=1e-9), action
    assert run("unscale own", False) == pytest.approx(expected, rel=1e-9)
    # without optimizer=, optimizers of the scaler in different stages are ambiguous
    with pytest.raises(RuntimeError, match="optimizer="):
        run("step other, unscale own", False)
