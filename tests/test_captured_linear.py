"""Linear uses of a captured module's weight run through the fused kernel
(gradnoise/layers/captured_linear.py): per-sample norms against a float64
loop over the samples with plain autograd, and the model's gradients against
the untracked step's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradnoise import GradNoiseTracker


class Conv1DLike(nn.Module):
    """GPT-2's Conv1D: addmm on the batch viewed as rows, W stored [d, p]."""

    def __init__(self, d, p, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, p) / d ** 0.5)
        self.bias = nn.Parameter(torch.randn(p) * 0.1) if bias else None

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        if self.bias is None:
            return (x.view(-1, x.shape[-1]) @ self.weight).view(shape)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


class LinearFunctional(nn.Module):
    """F.linear on a 3-D batch, W stored [p, d]."""

    def __init__(self, d, p):
        super().__init__()
        self.w = nn.Parameter(torch.randn(p, d) / d ** 0.5)
        self.b = nn.Parameter(torch.randn(p) * 0.1)

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class Matmul3D(nn.Module):
    """torch.matmul of a 3-D batch with a [d, p] parameter, no bias."""

    def __init__(self, d, p):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, p) / d ** 0.5)

    def forward(self, x):
        return torch.matmul(x, self.w)


class TwiceUsed(nn.Module):
    """One weight in two linear uses: the per-sample gradient sums over both."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w) @ self.w


def _model(layer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), layer, nn.Tanh(),
                         nn.Linear(layer_out(layer), 2))


def layer_out(layer):
    return {Conv1DLike: lambda m: m.weight.shape[1], LinearFunctional: lambda m: m.w.shape[0],
            Matmul3D: lambda m: m.w.shape[1], TwiceUsed: lambda m: m.w.shape[1]}[type(layer)](layer)


def _fused_nodes(out) -> int:
    """How many captured linear uses the graph of `out` runs through the fused kernel."""
    seen, todo, count = set(), [out.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == "_CapturedLinearBackward"
        todo.extend(f for f, _ in fn.next_functions)
    return count


def _loop_truth(model, x, loss):
    """‖∇θ ℓ_i‖² per sample and per top-level child, float64, by a loop over samples."""
    m = copy.deepcopy(model).double()
    per_layer = {}
    for i in range(x.shape[0]):
        m.zero_grad()
        loss(m(x[i:i + 1].double())).backward()
        for name, child in m.named_children():
            sq = sum((p.grad.square().sum() for p in child.parameters() if p.grad is not None),
                     torch.zeros((), dtype=torch.float64))
            per_layer.setdefault(name, []).append(sq)
    return {n: torch.stack(v) for n, v in per_layer.items() if any(t > 0 for t in v)}


LAYERS = [lambda: Conv1DLike(5, 7), lambda: Conv1DLike(5, 3), lambda: Conv1DLike(5, 4, bias=False),
          lambda: LinearFunctional(5, 7), lambda: LinearFunctional(5, 3), lambda: Matmul3D(5, 4)]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_captured_linear_uses_are_fused_and_exact(make, reduction):
    model = _model(make())
    x = torch.randn(4, 9, 6)

    def loss(out):
        per_token = out.square().sum(-1)
        return per_token.mean() if reduction == "mean" else per_token.sum()

    truth = _loop_truth(model, x, lambda o: o.square().sum())
    plain = copy.deepcopy(model)
    loss(plain(x)).backward()
    with GradNoiseTracker(model, loss_reduction=reduction) as tracker:
        out = model(x)
        assert _fused_nodes(out) == 1
        loss(out).backward()
        assert tracker.fallback_modules == []
        got = tracker.per_layer_sq_norms()
    # gradnoise's convention for a mean loss is ‖B·g_i‖², g_i sample i's
    # gradient of the batch loss: with the per-token mean, 1/T of its sum loss's
    scale = 1.0 / x.shape[1] ** 2 if reduction == "mean" else 1.0
    for name, t in truth.items():
        expected = t * scale
        torch.testing.assert_close(got[name].double(), expected, rtol=2e-5, atol=0)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_a_weight_in_two_linear_uses_is_summed_over_them():
    model = _model(TwiceUsed(5))
    x = torch.randn(3, 4, 6)
    truth = _loop_truth(model, x, lambda o: o.square().sum())
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        out = model(x)
        assert _fused_nodes(out) == 2
        out.square().sum().backward()
        assert tracker.fallback_modules == []
        torch.testing.assert_close(tracker.per_layer_sq_norms()["2"].double(), truth["2"],
                                   rtol=2e-5, atol=0)


def test_double_backward_through_a_captured_linear_use():
    model = _model(Conv1DLike(5, 7))
    x = torch.randn(3, 4, 6)

    def step(m):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = m(xi).square().sum()
        gx, = torch.autograd.grad(out, xi, create_graph=True)
        (out + gx.square().sum()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = step(copy.deepcopy(model))
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    tracked = step(model)
    for n in plain:
        torch.testing.assert_close(tracked[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(RuntimeError, match="create_graph"):
        tracker.per_sample_sq_norms()


def test_bf16_autocast_through_a_captured_linear_use():
    model = _model(Conv1DLike(5, 7))
    x = torch.randn(4, 9, 6)
    truth = _loop_truth(model, x, lambda o: o.square().sum())
    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(x)
    out.float().square().sum().backward()
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        got = tracker.per_layer_sq_norms()["2"].double()
    # bfloat16 products: a few parts in a thousand
    torch.testing.assert_close(got, truth["2"], rtol=3e-2, atol=0)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3, msg=n)


def test_activation_checkpointing_runs_the_captured_use_as_it_is():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _model(Conv1DLike(5, 7))

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    model = Checkpointed()
    x = torch.randn(3, 4, 6)
    truth = _loop_truth(model.inner, x, lambda o: o.square().sum())
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).square().sum().backward()
        torch.testing.assert_close(tracker.per_layer_sq_norms()["inner.2"].double(),
                                   truth["2"], rtol=2e-5, atol=0)


def test_without_fused_backward_autograd_keeps_the_call_bit_for_bit():
    model = _model(Conv1DLike(5, 7))
    x = torch.randn(4, 9, 6)
    truth = _loop_truth(model, x, lambda o: o.square().sum())
    plain = copy.deepcopy(model)
    plain(x).square().sum().backward()
    with GradNoiseTracker(model, loss_reduction="sum", fused_backward=False) as tracker:
        out = model(x)
        assert _fused_nodes(out) == 0
        out.square().sum().backward()
        torch.testing.assert_close(tracker.per_layer_sq_norms()["2"].double(), truth["2"],
                                   rtol=2e-5, atol=0)
    assert torch.equal(model[2].weight.grad, plain[2].weight.grad)
    assert torch.equal(model[2].bias.grad, plain[2].bias.grad)
