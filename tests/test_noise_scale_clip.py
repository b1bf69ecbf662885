"""GradientNoiseScale.step(grad_norm=...): ‖G_B‖² from the total norm that
clip_grad_norm_ returns, after clipping, gives the reading of an unclipped
step that reads every gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradnoise import GradNoiseTracker
from gradnoise.noise_scale import GradientNoiseScale
from gradnoise.noise_scale.gradients import GradSqNorms


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).double()


def _steps(source, clip, per_layer=False, layers="all", steps=4, micro=2):
    """Readings (whole model and per layer) of `steps` steps of 12 samples
    in `micro` micro-batches; with `clip`, each step clips to a tenth of its
    norm and passes the returned norm."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    tracker = (GradNoiseTracker(model, layers=layers) if source == "per_sample" else None)
    gns = GradientNoiseScale(model, source=source, beta=0.5, per_layer=per_layer, tracker=tracker)
    readings = []
    for _ in range(steps):
        x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
        y = 2.0 + 0.3 * torch.randn(12, 3, generator=gen, dtype=torch.float64)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (nn.functional.mse_loss(model(xs), ys) / micro).backward()
            if source == "per_sample":
                gns.after_backward(1.0 / micro)
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1 * float(norm))
            gns.step(12, grad_norm=norm)
        else:
            gns.step(12)
        readings.append((gns.read(), gns.read_layers()))
        model.zero_grad()
    gns.close()
    return readings


@pytest.mark.parametrize("source", ["per_sample", "micro_batch"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_given_norm_after_clipping_reads_as_the_unclipped_step(source, per_layer):
    plain = _steps(source, clip=False, per_layer=per_layer)
    given = _steps(source, clip=True, per_layer=per_layer)
    for (a, layers_a), (b, layers_b) in zip(plain, given):
        assert b.sq_norm == pytest.approx(a.sq_norm, rel=1e-9)
        assert b.trace == pytest.approx(a.trace, rel=1e-9)
        assert b.b_simple == pytest.approx(a.b_simple, rel=1e-9)
        assert layers_a.keys() == layers_b.keys()
        for k in layers_a:
            assert layers_b[k].b_simple == pytest.approx(layers_a[k].b_simple, rel=1e-9)


@pytest.mark.parametrize("source", ["per_sample", "micro_batch"])
def test_given_norm_reads_no_gradient(source, monkeypatch):
    def refuse(self):
        raise AssertionError("a gradient was read although the step was given its norm")
    monkeypatch.setattr(GradSqNorms, "per_layer", refuse)
    readings = _steps(source, clip=True)
    assert readings[-1][0].b_simple is not None


def test_tracker_of_some_layers_reads_its_layers_scaled_to_the_given_norm():
    """layers="norm": the small batches cover the LayerNorm only, so the
    batch norm of that layer is read and scaled back to the given total."""
    plain = _steps("per_sample", clip=False, layers="norm")
    given = _steps("per_sample", clip=True, layers="norm")
    for (a, _), (b, _) in zip(plain, given):
        assert b.b_simple == pytest.approx(a.b_simple, rel=1e-9)
        assert b.sq_norm == pytest.approx(a.sq_norm, rel=1e-9)


def test_non_finite_norm_skips_the_step_and_bad_norms_are_refused():
    model = _model()
    gns = GradientNoiseScale(model, source="micro_batch")
    x = torch.randn(8, 5, dtype=torch.float64)
    for xs in x.chunk(2):
        (model(xs).square().mean() / 2).backward()
    assert gns.step(8, grad_norm=torch.tensor(float("inf"))) is None
    assert gns.skipped_steps == 1
    for xs in x.chunk(2):
        (model(xs).square().mean() / 2).backward()
    with pytest.raises(ValueError, match="grad_norm"):
        gns.step(8, grad_norm=-1.0)
    with pytest.raises(TypeError, match="grad_norm"):
        gns.step(8, grad_norm="large")


# ----------------------------------------------------- AdaptiveBatch clipping
def _controller_run(clip, steps=6):
    from gradnoise.adaptive import AdaptiveBatch
    from tests.helpers import index_dataset
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    c = AdaptiveBatch(model, opt, index_dataset(96), initial_batch=8, max_batch=8,
                      micro_batch=4, noise_source="per_sample")
    for x, y, _ in c.run(max_steps=steps):
        c.backward(nn.functional.mse_loss(model(x), y))
        c.step(clip_grad_norm=clip)
    c.close()
    return [r["b_simple"] for r in c.history], model.weight.detach().clone()


def test_controller_takes_the_batch_norm_from_its_own_clipping(monkeypatch):
    """AdaptiveBatch.step(clip_grad_norm=...) clips first and passes the norm:
    a clip that never bites gives the unclipped run's readings, without a
    second read of the gradients."""
    plain, w_plain = _controller_run(None)
    monkeypatch.setattr(GradSqNorms, "per_layer", lambda self: pytest.fail("gradient read"))
    clipped, w_clipped = _controller_run(1e9)
    # float32 gradients: clip_grad_norm_ sums in float32, the reader in float64
    assert clipped == pytest.approx(plain, rel=1e-5)
    assert torch.equal(w_plain, w_clipped)
    monkeypatch.undo()
    bitten, w_bitten = _controller_run(1e-3)
    assert bitten[0] == pytest.approx(plain[0], rel=1e-5)   # same weights at the first step
    assert not torch.allclose(w_bitten, w_plain)


def test_optimizer_without_a_learning_rate_is_refused_and_a_mismatched_rule_warned():
    from gradnoise.adaptive import AdaptiveBatch
    from tests.helpers import index_dataset
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = None
    with pytest.raises(ValueError, match="SGD optimizer has lr=None"):
        AdaptiveBatch(model, opt, index_dataset(32), initial_batch=8, max_batch=16, micro_batch=4)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="Adam optimizer is usually scaled by the 'sqrt'"):
        AdaptiveBatch(model, adam, index_dataset(32), initial_batch=8, max_batch=16,
                      micro_batch=4, lr_rule="linear").close()


def test_controller_reads_the_gradients_when_its_optimizer_holds_only_some(monkeypatch):
    """Clipping over the optimizer's parameters is not ‖G_B‖ of the model's
    when the optimizer holds only some of them: the gradients are read."""
    from gradnoise.adaptive import AdaptiveBatch
    from tests.helpers import index_dataset

    def run(clip):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = torch.optim.SGD(model[0].parameters(), lr=0.05)
        c = AdaptiveBatch(model, opt, index_dataset(64), initial_batch=8, max_batch=8,
                          micro_batch=4, noise_source="per_sample")
        for x, y, _ in c.run(max_steps=4):
            c.backward(nn.functional.mse_loss(model(x), y))
            c.step(clip_grad_norm=clip)
        c.close()
        return [r["b_simple"] for r in c.history]
    assert run(1e9) == pytest.approx(run(None), rel=1e-9)
