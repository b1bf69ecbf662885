"""The front fit and the noisy quadratic model's known answers."""
import math

import numpy as np
import pytest
import torch

from gradnoise.critical_batch import NoisyQuadratic, fit_front, linear_scaling_limit, pareto_product
from gradnoise.critical_batch.judge import place, place_history, steps_and_examples
from gradnoise.critical_batch.nqm import QuadraticModel
from gradnoise.noise_scale import GradientNoiseScale


@pytest.mark.parametrize("s_min,b_crit,noise", [(50.0, 40.0, 0.05), (300.0, 700.0, 0.08),
                                                (12.0, 3.0, 0.03)])
def test_fit_gives_back_a_known_hyperbola_within_its_interval(s_min, b_crit, noise):
    rng = np.random.default_rng(1)
    batches = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    steps = s_min * (1 + b_crit / batches) * np.exp(rng.normal(0, noise, len(batches)))
    fit = fit_front(batches, steps, bootstrap=300)
    lo, hi = fit.b_crit_interval
    assert lo <= b_crit <= hi
    assert fit.s_min_interval[0] <= s_min <= fit.s_min_interval[1]
    assert fit.e_min_interval[0] <= s_min * b_crit <= fit.e_min_interval[1]
    assert fit.b_crit == pytest.approx(b_crit, rel=4 * noise * math.sqrt(3))
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
    # residuals are measured − fitted, in log steps
    fitted = np.log(fit.s_min * (1 + fit.b_crit / batches))
    np.testing.assert_allclose(fit.residuals, np.log(steps) - fitted, atol=1e-12)


def test_exact_points_fit_exactly_and_sit_on_the_front():
    batches = [3, 10, 30, 100, 300]
    steps = [20.0 * (1 + 60.0 / b) for b in batches]
    fit = fit_front(batches, steps, bootstrap=0)
    assert fit.s_min == pytest.approx(20.0, rel=1e-6)
    assert fit.b_crit == pytest.approx(60.0, rel=1e-6)
    for b, s in zip(batches, steps):
        assert fit.pareto_product(s, s * b) == pytest.approx(1.0, rel=1e-6)
    assert fit.pareto_product(0.9 * 20 * (1 + 60 / 30), 0.9 * 20 * (1 + 60 / 30) * 30) < 1
    assert pareto_product(40.0, 2400.0, 20.0, 1200.0) == pytest.approx(1.0)


def test_linear_scaling_limit_is_twenty_percent_above_the_smallest_batch():
    # E(B) = 100·(B + 50): E(B)/E(2) = 1.2 at B = 12.4; between measured 8 and 16
    batches = [2, 4, 8, 16, 32]
    steps = [100 * (b + 50) / b for b in batches]
    got = linear_scaling_limit(batches, steps)
    assert 8 < got < 16
    e = lambda b: 100 * (b + 50)
    t = (math.log(1.2 * e(2)) - math.log(e(8))) / (math.log(e(16)) - math.log(e(8)))
    assert got == pytest.approx(math.exp(math.log(8) + t * math.log(2)), rel=1e-12)
    assert linear_scaling_limit([2, 4], [10.0, 5.0]) is None   # perfect scaling: never


@pytest.mark.parametrize("bad,match", [(([4, 4], [1.0, 2.0]), "two batch sizes"),
                                       (([4, 8], [1.0, math.inf]), "finite and > 0"),
                                       (([4, 8, 16], [1.0, 2.0]), "one length")])
def test_fit_refuses_what_it_cannot_fit(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_front(*bad)


def test_quadratic_recursion_is_the_mean_of_the_stochastic_runs():
    problem = NoisyQuadratic(dim=8, noise=4.0)
    lr, batch, steps, runs = 0.5, 4, 30, 4000
    h, c = problem.curvature(), problem.noise_variance()
    gen = torch.Generator().manual_seed(0)
    theta = problem.start().expand(runs, -1).clone()
    losses = []
    for _ in range(steps):          # each step's loss at its parameters before the update
        losses.append(0.5 * (h * theta.square()).sum(1))
        z = torch.randn(runs, batch, problem.dim, generator=gen, dtype=torch.float64)
        theta = theta - lr * (h * theta + c.sqrt() * z.mean(1))
    mc = torch.stack(losses, 1)
    expected = torch.from_numpy(problem.expected_losses(batch, lr, steps))
    spread = mc.std(0) / math.sqrt(runs)
    assert ((mc.mean(0) - expected).abs() <= 4 * spread + 1e-12).all()   # step 1: exact


def test_quadratic_model_trains_as_the_recursion_says():
    """The Task's model: its loss value is L(θ), its gradient ∇L + √c ⊙ z̄."""
    problem = NoisyQuadratic(dim=6, noise=2.0)
    model = QuadraticModel(problem).double()
    z = torch.randn(5, 6, dtype=torch.float64)
    loss = model(z)
    loss.backward()
    theta = model.theta.detach()
    assert loss.item() == pytest.approx(0.5 * float((model.h * theta ** 2).sum()))
    truth = model.h * theta + model.sqrt_c * z.mean(0)
    torch.testing.assert_close(model.theta.grad, truth)


def test_noise_scale_at_the_start_matches_the_closed_form():
    """B_simple = Σ c_j / Σ h_j² θ_j², read by GradientNoiseScale from two
    micro-batches per step at a fixed θ (learning rate 0)."""
    problem = NoisyQuadratic(dim=16, noise=3.0)
    model = QuadraticModel(problem)
    gns = GradientNoiseScale(model, source="micro_batch", beta=0.99)
    gen = torch.Generator().manual_seed(3)
    for _ in range(600):
        model.zero_grad()
        for _ in range(2):
            (model(torch.randn(16, problem.dim, generator=gen)) / 2).backward()
        reading = gns.step(32)
    truth = problem.b_simple()
    assert truth == pytest.approx(3.0 * float(problem.curvature().sum())
                                  / float(problem.curvature().square().sum()))
    assert abs(reading.b_simple - truth) < 3 * reading.stderr + 0.05 * truth
    gns.close()


def test_analytic_steps_read_the_curve_as_a_run_does():
    problem = NoisyQuadratic(dim=8, noise=1.0)
    curve = problem.expected_losses(4, 0.3, 200)
    assert curve[0] == pytest.approx(0.5 * float(problem.curvature().sum()))  # step 1: the start
    target = float(curve[49]) * 1.0000001        # the loss of step 50: after 49 updates
    assert problem.analytic_steps(4, 0.3, target, 200) == 49
    # a trailing mean over 5 steps lags by 2 steps: corrected back
    assert abs(problem.analytic_steps(4, 0.3, target, 200, window=5) - 49) <= 1
    assert problem.analytic_steps(4, 0.3, 1e-9, 200) == math.inf   # below the noise floor
    steps, lr = problem.best_analytic_steps(4, target, 200)
    assert steps <= 49 and lr > 0


def test_a_run_is_placed_where_its_smoothed_loss_crosses_the_target():
    # each step's loss is taken before its update; it falls by 0.01 a step from
    # 1.0, first below 0.5037 at step 51: after 50 updates
    losses = [1.0 - 0.01 * k for k in range(100)]
    samples = [8 * (k + 1) if k < 40 else 320 + 16 * (k - 39) for k in range(100)]
    s, e = steps_and_examples(losses, samples, 0.5037, window=1)
    assert s == 50 and e == samples[49]
    # a trailing mean over 9 steps of a straight line is the line 4 steps back: no lag left
    assert steps_and_examples(losses, samples, 0.5037, window=9) == (50, samples[49])
    # a crossing between two updates takes its examples in between
    s2, e2 = steps_and_examples(losses, samples, 0.5037, window=2)
    assert s2 == 50.5 and e2 == (samples[49] + samples[50]) / 2
    assert steps_and_examples(losses, samples, -1.0) is None
    assert steps_and_examples(losses, samples, 2.0, window=1) == (0, 0)   # before any update
    fit = fit_front([8, 16, 32, 64], [40 * (1 + 20 / b) for b in (8, 16, 32, 64)], bootstrap=0)
    placed = place(losses, samples, {0.5037: fit, 2.0: fit, -1.0: "no front"}, window=1)
    assert [p.target for p in placed] == [2.0, 0.5037, -1.0]
    assert placed[0].steps == 0 and placed[2].steps is None
    assert placed[1].pareto_product == pytest.approx(pareto_product(50, samples[49], fit.s_min,
                                                                    fit.e_min))
    # a step the GradScaler skipped is no update
    history = [{"loss": v, "samples": n, "skipped": False} for v, n in zip(losses, samples)]
    history.insert(10, {"loss": 9.9, "samples": samples[9] + 8, "skipped": True})
    for h in history[11:]:
        h["samples"] += 8
    assert place_history(history, {0.5037: fit}, window=1)[0].steps == 50


def test_verdict_keeps_each_configuration_s_worst_seed():
    from gradnoise.critical_batch.compare import Variant, verdict
    from gradnoise.critical_batch.judge import Placement
    results = {Variant("critical", "sqrt", 0): [Placement(2.0, 10, 100, 0.5),
                                                Placement(1.5, 20, 300, 1.5)],
               Variant("critical", "sqrt", 1): [Placement(2.0, 11, 110, 0.9),
                                                Placement(1.5, None, None, None)],
               Variant("goodput", "sqrt", 0): [Placement(2.0, 10, 90, 1.2),
                                               Placement(1.5, 18, 250, 0.8)]}
    got = verdict(results)
    assert got[("critical", "sqrt")]["worst_product"] == {2.0: 0.9, 1.5: math.inf}
    assert got[("critical", "sqrt")]["targets_met"] == [2.0]
    assert got[("goodput", "sqrt")]["targets_met"] == [1.5]


def test_b_noise_along_a_run_matches_the_closed_form():
    """The Hessian-aware noise scale read by a run at the start of the
    quadratic model, against Σ h_j c_j / Σ h_j³ θ_j², from a training batch of
    2 (the readings draw their own batches of 64). Tolerance: four standard
    errors of the mean of 40 readings. Without the correction for the batch
    gradient's own noise the readings would sit about 10% low here."""
    from gradnoise.critical_batch import RunSpec, quadratic_task, train_run
    problem = NoisyQuadratic(dim=32, power=0.5, noise=4.0)
    spec = RunSpec(batch=2, lr=0.0, seed=0, targets=(-1.0,), max_steps=40, window=1,
                   hessian_interval=1, hessian_samples=64)
    record = train_run(quadratic_task(problem), spec)
    readings = [h["b_noise"] for h in record.hessian]
    assert len(readings) == 40
    se = np.std(readings, ddof=1) / np.sqrt(len(readings))
    assert abs(np.mean(readings) - problem.b_noise()) <= 4 * se
    # the training batches are those of a run that reads nothing
    plain = train_run(quadratic_task(problem), RunSpec(batch=2, lr=0.1, seed=0, targets=(-1.0,),
                                                       max_steps=10, window=1))
    read = train_run(quadratic_task(problem), RunSpec(batch=2, lr=0.1, seed=0, targets=(-1.0,),
                                                      max_steps=10, window=1,
                                                      hessian_interval=3))
    assert read.losses == plain.losses
    h = problem.curvature()
    assert problem.b_noise() == pytest.approx(float((4 * h * h).sum() / h.pow(3).sum()))
