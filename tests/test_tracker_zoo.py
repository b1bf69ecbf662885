"""GradNoiseTracker on a zoo of models against torch.func per-sample gradients
in float64 (tests/ground_truth.py), per sample and per layer, and on
hypothesis-generated Linear and convolution shapes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradnoise import GradNoiseTracker
from tests.ground_truth import model_per_sample_sq_norms
from tests.helpers import RTOL, classification_case, make_case, ZOO


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("B", [1, 5])
def test_zoo_matches_torch_func(name, reduction, B):
    model, x, y, batch_loss, sample_loss = make_case(name, B, reduction)
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction=reduction)
    batch_loss(model(x)).backward()
    norms = tracker.per_sample_sq_norms()
    assert norms.dtype == torch.float32 and norms.shape == (B,)
    torch.testing.assert_close(norms.double(), truth, rtol=RTOL, atol=1e-8)
    per_layer = tracker.per_layer_sq_norms()
    torch.testing.assert_close(sum(per_layer.values()).double(), norms.double(), rtol=1e-6, atol=0)
    tracker.detach()


def test_per_layer_keys_and_values():
    model, x, y, batch_loss, sample_loss = make_case("lm", 4, "sum")
    names = [n for n, m in model.named_modules()
             if any(p.requires_grad for p in m.parameters(recurse=False))]
    truths = {name: model_per_sample_sq_norms(model, x, y, sample_loss,
                                              [f"{name}.weight", f"{name}.bias"])
              for name in ("blocks.0.fc1", "ln_f")}
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    batch_loss(model(x)).backward()
    per_layer = tracker.per_layer_sq_norms()
    # the tied head weight counts under its first owner, the embedding
    assert list(per_layer) == [n for n in names if n != "head"]
    for name, truth in truths.items():
        torch.testing.assert_close(per_layer[name].double(), truth, rtol=RTOL, atol=1e-8)
    assert tracker.fallback_modules == ["pos"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_layer_sums_and_matrix_agree_with_per_layer_norms(reduction):
    model, x, y, batch_loss, _ = make_case("lm", 5, reduction)
    tracker = GradNoiseTracker(model, loss_reduction=reduction)
    batch_loss(model(x)).backward()
    per_layer = tracker.per_layer_sq_norms()
    names, sums, B = tracker.per_layer_sums()
    matrix_names, matrix = tracker.per_layer_sq_norm_matrix()
    assert names == matrix_names == list(per_layer) and B == 5
    for k, name in enumerate(names):
        assert torch.equal(matrix[k], per_layer[name])
        assert sums[k] == pytest.approx(per_layer[name].double().sum().item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_layers_norm_tracks_only_normalisation_layers(reduction):
    model, x, y, batch_loss, sample_loss = make_case("lm", 3, reduction)
    norm_params = [n for n, p in model.named_parameters() if ".ln" in n or n.startswith("ln")]
    truth = model_per_sample_sq_norms(model, x, y, sample_loss, norm_params)
    tracker = GradNoiseTracker(model, loss_reduction=reduction, layers="norm")
    batch_loss(model(x)).backward()
    assert set(tracker.per_layer_sq_norms()) == {"blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1",
                                                 "blocks.1.ln2", "ln_f"}
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


def test_layers_callable_and_frozen_weight_with_trainable_bias():
    model, x, y, batch_loss, sample_loss = make_case("mlp", 5, "sum")
    model.net[0].weight.requires_grad_(False)
    truth = model_per_sample_sq_norms(model, x, y, sample_loss, ["net.0.bias"])
    tracker = GradNoiseTracker(model, loss_reduction="sum", layers=lambda n, m: n == "net.0")
    batch_loss(model(x)).backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)
    assert model.net[0].weight.grad is None


@settings(max_examples=12, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), k=st.integers(1, 3), stride=st.integers(1, 2),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), same=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 1000))
def test_hypothesis_conv_hyper_parameters(dims, k, stride, dilation, groups, same, bias, seed):
    torch.manual_seed(seed)
    conv_cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
    padding = "same" if same and stride == 1 else 1
    conv = conv_cls(4, 6, k, stride=stride, dilation=dilation, groups=groups, padding=padding,
                    bias=bias)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, 4, *([7] * dims))
    model(x)
    y, batch_loss, sample_loss = classification_case(model, x, 3, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    batch_loss(model(x)).backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


@settings(max_examples=10, deadline=None)
@given(d=st.integers(1, 12), p=st.integers(1, 12), mid=st.lists(st.integers(1, 5), max_size=2),
       bias=st.booleans(), B=st.integers(1, 6), seed=st.integers(0, 1000))
def test_hypothesis_linear(d, p, mid, bias, B, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, p, bias=bias), nn.Tanh(), nn.Linear(p, 2))
    x = torch.randn(B, *mid, d)
    y = torch.randn(B, *mid, 2)

    def sample_loss(out_i, y_i):
        return (out_i - y_i).square().sum()

    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    (model(x) - y).square().sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)
