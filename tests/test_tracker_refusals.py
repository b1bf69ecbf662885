"""What GradNoiseTracker refuses, by name, rather than measuring wrongly; half
precision and autocast."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradnoise import GradNoiseTracker
from gradnoise.layers import NormRule, register_rule
from tests.ground_truth import model_per_sample_sq_norms
from tests.helpers import RTOL, MLP, classification_case, make_case


# ------------------------------------------------------------ bad input
def test_batchnorm_in_train_mode_is_refused_with_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(2), nn.BatchNorm1d(2, affine=False))
    model(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError) as err:
        GradNoiseTracker(model)
    msg = str(err.value)
    assert "'1' (BatchNorm2d)" in msg and "'5' (BatchNorm1d)" in msg
    assert "eval" in msg and "GroupNorm" in msg and "micro-batch" in msg
    # eval-mode BatchNorm is supported and exact
    model.eval()
    model[0].train(), model[4].train()
    x = torch.randn(3, 3, 6, 6)
    y, batch_loss, sample_loss = classification_case(model, x, 2, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    batch_loss(model(x)).backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)
    # switched to train mode after attaching: refused at the next forward
    model[1].train()
    with pytest.raises(RuntimeError, match="'1' \\(BatchNorm2d\\)"):
        model(x)


def test_unsupported_error_and_skip():
    model, x, y, batch_loss, sample_loss = make_case("lm", 2, "sum")
    with pytest.raises(ValueError, match="'pos' \\(PositionalEmbedding\\).*register_rule"):
        GradNoiseTracker(model, unsupported="error")
    tracker = GradNoiseTracker(model, loss_reduction="sum", unsupported="skip")
    assert tracker.skipped_modules == ["pos"]
    batch_loss(model(x)).backward()
    assert "pos" not in tracker.per_layer_sq_norms()


def test_user_registered_rule():
    class Scale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.s = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * self.s

    @register_rule(Scale)
    class ScaleRule(NormRule):
        def sq_norms(self, module, calls, params):
            (c,) = calls
            x, g = c.args[0], c.grad_outputs[0]
            return (x * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1).square().sum(1)

    model = nn.Sequential(nn.Linear(4, 4), Scale(4), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    y, batch_loss, sample_loss = classification_case(model, x, 2, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum", unsupported="error")
    batch_loss(model(x)).backward()
    assert tracker.fallback_modules == []
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


def test_batch_dimension_mismatch_is_an_error():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):  # x [B, T, 4]; b sees [T, B, 4]
            return self.b(self.a(x).transpose(0, 1))

    model = SeqFirst()
    GradNoiseTracker(model, loss_reduction="sum")
    with pytest.raises(RuntimeError, match="batch dimension.*differs"):
        model(torch.randn(3, 5, 4)).sum().backward()


def test_bad_arguments():
    model = MLP()
    with pytest.raises(ValueError, match="loss_reduction"):
        GradNoiseTracker(model, loss_reduction="avg")
    with pytest.raises(ValueError, match="layers"):
        GradNoiseTracker(model, layers="linear")
    with pytest.raises(ValueError, match="unsupported"):
        GradNoiseTracker(model, unsupported="ignore")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GradNoiseTracker(lambda x: x)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_norms_in_float32(dtype, name):
    model, x, y, batch_loss, sample_loss = make_case(name, 4, "sum")
    truth = model_per_sample_sq_norms(model.to(dtype).float(), x.to(dtype).float(), y, sample_loss)
    model.to(dtype)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    batch_loss(model(x.to(dtype)).float()).backward()
    norms = tracker.per_sample_sq_norms()
    assert norms.dtype == torch.float32 and torch.isfinite(norms).all()
    # half-precision forward and backward: agreement to the dtype's precision
    torch.testing.assert_close(norms.double(), truth, rtol=0.1, atol=1e-3)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_autocast(name):
    model, x, y, batch_loss, sample_loss = make_case(name, 4, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    batch_loss(out.float()).backward()
    norms = tracker.per_sample_sq_norms()
    assert norms.dtype == torch.float32 and torch.isfinite(norms).all()
    torch.testing.assert_close(norms.double(), truth, rtol=0.1, atol=1e-3)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
