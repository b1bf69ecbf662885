"""GradNoiseTracker's step semantics: outputs and gradients as without it,
tied weights, modules called several times, fused and autograd backward
passes, activation checkpointing, attach/detach, memory released."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from gradnoise import GradNoiseTracker
from tests.ground_truth import model_per_sample_sq_norms
from tests.helpers import (RTOL, classification_case, forward_backward, make_case,
                           plain_then_tracked)


@pytest.mark.parametrize("name", ["lm", "cnn"])
def test_outputs_unchanged_and_grads_match(name):
    model, x, y, batch_loss, _ = make_case(name, 4, "mean")
    grads_plain, tracker = plain_then_tracked(model, x, batch_loss)
    for n, p in model.named_parameters():
        # Bitwise unless the fused kernel replaced a weight-gradient GEMM,
        # whose sum runs in another order: then equal to float rounding.
        torch.testing.assert_close(p.grad, grads_plain[n], rtol=1e-5, atol=1e-7)
    assert tracker.per_sample_sq_norms().shape == (4,)


def test_tied_weight_uses_keep_the_fused_backward():
    """A Linear whose only parameter is a tied weight keeps the fused backward
    (its own term comes with the weight gradient; the cross terms with the
    other uses come from their factors); one with a bias of its own does not."""
    model, x, y, batch_loss, _ = make_case("tied", 3, "sum")
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    assert set(tracker.fused_modules) == {"mix", "head", "pool_head"}
    assert set(GradNoiseTracker(model, fused_backward=False).fused_modules) == set()


def test_weight_tied_with_a_module_without_factors_is_materialised():
    """An embedding weight also used by a module only the generic fallback
    knows: per-sample gradients of every use, summed, then squared."""
    class Readout(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, h):
            return h @ self.weight.T

    class Model(nn.Module):
        def __init__(self, V=9, d=4):
            super().__init__()
            self.embed = nn.Embedding(V, d, padding_idx=1)
            self.readout = Readout(self.embed.weight)

        def forward(self, idx):
            return self.readout(torch.tanh(self.embed(idx)).mean(1))

    model = Model()
    x = torch.randint(0, 9, (5, 6))
    x[:, 0] = 1
    x[0, 2] = x[0, 3]
    y = torch.randint(0, 9, (5,))
    truth = model_per_sample_sq_norms(model, x, y, lambda out, t: nn.functional.cross_entropy(
        out, t, reduction="sum"))
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    assert tracker.fallback_modules == ["readout"]
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("head_input", ["positions", "pooled"])
def test_tied_head_does_not_keep_the_logits_gradient(head_input):
    """The cross terms of a tied head need its output gradient only at the
    embedding's tokens: the [B, T, vocabulary] gradient is gone before
    backward reaches the embedding, and the norms are exact."""
    import weakref

    class Tied(nn.Module):
        def __init__(self, V=13, d=5):
            super().__init__()
            self.embed = nn.Embedding(V, d, padding_idx=2)
            self.mix = nn.Linear(d, d)
            self.head = nn.Linear(d, V, bias=False)
            self.head.weight = self.embed.weight
            self.refs, self.alive = [], []

        def forward(self, idx):
            e = self.embed(idx)
            if e.requires_grad:
                e.register_hook(lambda g: self.alive.append([r() is not None for r in self.refs]))
            h = torch.tanh(self.mix(e))
            logits = self.head(h if head_input == "positions" else h.mean(1))
            if logits.requires_grad:
                logits.register_hook(lambda g: self.refs.append(weakref.ref(g)))
            return logits if head_input == "pooled" else logits.mean(1)

    model = Tied()
    x = torch.randint(0, 13, (4, 6))
    x[:, 1] = 2
    y = torch.randint(0, 13, (4,))
    truth = model_per_sample_sq_norms(model, x, y, lambda out, t: nn.functional.cross_entropy(
        out, t, reduction="sum"))
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    assert model.alive == [[False]]
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("kinds", ["dense-dense", "dense-onehot", "onehot-dense", "onehot-onehot"])
def test_cross_terms_of_shared_weight_factors(kinds):
    """⟨G_i^u, G_i^v⟩ from factors against materialised float64 gradients."""
    from gradnoise.layers.tied import Factor, cross_sq_norms
    gen = torch.Generator().manual_seed(3)
    B, V, d = 5, 9, 4

    def make(kind, T, pad):
        if kind == "dense":
            a, z = torch.randn(B, T, V, generator=gen), torch.randn(B, T, d, generator=gen)
            return Factor("dense", z=z, a=a), torch.einsum("btv,btd->bvd", a.double(), z.double())
        tok = torch.randint(0, V, (B, T), generator=gen)
        tok[:, 0] = tok[:, -1]  # repeated
        z = torch.randn(B, T, d, generator=gen)
        g = torch.zeros(B, V, d, dtype=torch.float64)
        for b in range(B):
            keep = tok[b] != pad if pad is not None else torch.ones(T, dtype=torch.bool)
            g[b].index_add_(0, tok[b][keep], z[b][keep].double())
        return Factor("onehot", z=z, tokens=tok, padding_idx=pad), g

    ku, kv = kinds.split("-")
    (u, gu), (v, gv) = make(ku, 6, 2), make(kv, 3, None)
    truth = (gu * gv).sum((1, 2))
    for chunk in (1, 2**20):  # one sample per chunk, and all at once
        torch.testing.assert_close(cross_sq_norms(u, v, chunk).double(), truth,
                                   rtol=1e-5, atol=1e-6)


def test_fused_backward_covers_linear_zero_padded_convs_and_group_norm():
    model, x, y, batch_loss, _ = make_case("cnn", 3, "sum")
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    # reflect padding (features.6) is measured after backward instead
    assert tracker.fused_modules == ["features.0", "features.1", "features.3", "features.4",
                                     "head"]
    assert GradNoiseTracker(model, fused_backward=False).fused_modules == []


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv_and_group_norm_called_twice_sum_over_calls(reduction):
    class TwiceConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.norm = nn.GroupNorm(2, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.norm(self.conv(x)))
            return self.head(self.norm(self.conv(h)).mean((2, 3)))

    torch.manual_seed(0)
    model, x = TwiceConv(), torch.randn(5, 4, 6, 6)
    y, batch_loss, sample_loss = classification_case(model, x, 3, reduction)
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    grads_plain = torch.autograd.grad(batch_loss(model(x)), list(model.parameters()))
    tracker = GradNoiseTracker(model, loss_reduction=reduction)
    batch_loss(model(x)).backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)
    for p, g in zip(model.parameters(), grads_plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_row_norm_called_twice_sums_over_calls(norm):
    class TwiceNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 6)
            self.norm = norm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.norm(torch.tanh(self.norm(self.inp(x)))).mean(1))

    torch.manual_seed(0)
    model, x = TwiceNorm(), torch.randn(4, 7, 5)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    y, batch_loss, sample_loss = classification_case(model, x, 3, "sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    grads_plain = torch.autograd.grad(batch_loss(model(x)), list(model.parameters()))
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    batch_loss(model(x)).backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)
    for p, g in zip(model.parameters(), grads_plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lm", "cnn"])
def test_bitwise_unchanged_grads_without_fused_backward(name):
    model, x, y, batch_loss, _ = make_case(name, 4, "mean")
    grads_plain, _ = plain_then_tracked(model, x, batch_loss, fused_backward=False)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_plain[n]), n


def test_two_dimensional_linear_keeps_autograd_backward_bitwise():
    """With one position per sample the Linear norms cost O(B(d + p)) and
    come from the output gradient: the weight gradients stay autograd's."""
    model, x, y, batch_loss, sample_loss = make_case("mlp", 5, "mean")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    grads_plain, tracker = plain_then_tracked(model, x, batch_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_plain[n]), n
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_inputs_released_during_backward():
    """No activation outlives autograd's use of it: when backward reaches the
    first layer, the inputs of the later layers are gone."""
    import weakref
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    tracker = GradNoiseTracker(model)
    refs = []
    for k in (2, 4):
        model[k].register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0])))
    out = model(torch.randn(5, 8))
    alive = []
    first = model[0].weight
    first.register_hook(lambda g: alive.append([r() is not None for r in refs]))
    out.square().mean().backward()
    assert alive == [[False, False]]
    assert tracker.per_sample_sq_norms().shape == (5,)


@pytest.mark.parametrize("shape", [(6, 4), (6, 3, 4)])
def test_second_backward_through_the_same_graph_is_not_measured(shape):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    tracker = GradNoiseTracker(model)
    loss = model(torch.randn(*shape)).square().mean()
    loss.backward(retain_graph=True)
    first = tracker.per_sample_sq_norms()
    grads = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    assert torch.equal(tracker.per_sample_sq_norms(), first)
    for p, g in zip(model.parameters(), grads):  # gradients still accumulate as usual
        torch.testing.assert_close(p.grad, 2 * g)


class _Scale(nn.Module):
    """A bare parameter: measured by the generic fallback through hooks."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale


class _Twice(nn.Module):
    """One call that runs `inner` on both halves of x [B, 2, ...]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return (self.inner(x[:, 0]) * self.inner(x[:, 1])).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("path", ["2-D Linear", "Linear with positions", "hooks"])
def test_backward_through_two_forwards_is_an_error_not_a_wrong_number(path):
    shape = (4, 3, 6) if path == "Linear with positions" else (4, 6)
    first = _Scale(6) if path == "hooks" else nn.Linear(6, 6)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(6, 2))
    tracker = GradNoiseTracker(model)
    a, b = model(torch.randn(*shape)), model(torch.randn(*shape))
    with pytest.raises(RuntimeError, match="two forward passes of the model"):
        (a * b).sum().backward()
    tracker.detach()
    # the remedy the error names: one call of a module that runs both passes
    twice = _Twice(model)
    x = torch.randn(shape[0], 2, *shape[1:])
    truth = model_per_sample_sq_norms(twice, x, torch.zeros(shape[0]), lambda out, t: out.sum())
    with GradNoiseTracker(twice, loss_reduction="sum") as both:
        twice(x).sum().backward()
    torch.testing.assert_close(both.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 6)])
def test_activation_checkpointing(reentrant, shape):
    """Modules whose forward is recomputed during backward are measured in the
    same step as the rest (their recomputed call is the one with a gradient)."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 2)

        def block(self, t):
            return torch.tanh(self.ln(self.a(t)))

        def forward(self, x):
            transformed = torch._C._are_functorch_transforms_active()
            h = self.block(x) if transformed else checkpoint(self.block, x,
                                                              use_reentrant=reentrant)
            return self.b(h).reshape(x.shape[0], -1).sum(1)

    model = Checkpointed()
    x = torch.randn(*shape, requires_grad=reentrant)
    truth = model_per_sample_sq_norms(model, x.detach(), torch.zeros(shape[0]),
                                      lambda out, t: out.sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model(x).sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


def test_embedding_with_grad_scaled_by_frequency_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="'0'.*scale_grad_by_freq"):
        GradNoiseTracker(model)
    GradNoiseTracker(model, layers=lambda name, m: name != "0")  # left out: fine


def test_in_place_op_after_a_linear_with_positions():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    x, y = torch.randn(4, 3, 5), torch.randint(0, 2, (4,))

    def sample_loss(out, t):
        return nn.functional.cross_entropy(out.mean(1), t, reduction="sum")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    assert "0" in tracker.fused_modules
    sample_loss(model(x), y).backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=RTOL, atol=1e-8)


def test_attach_detach_idempotent_and_hooks_removed():
    model, x, y, batch_loss, _ = make_case("lm", 2, "sum")

    def hook_count(m):
        return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) + len(s._backward_hooks)
                   for s in m.modules())

    before = hook_count(model)
    forwards_before = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    assert tracker.attached and tracker.attach() is tracker
    attached = hook_count(model)
    tracker.attach()
    assert hook_count(model) == attached
    forward_backward(model, x, batch_loss)
    measured = tracker.per_sample_sq_norms()
    tracker.detach()
    tracker.detach()
    assert hook_count(model) == before
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == forwards_before
    # results of the last measured step stay readable after detach
    assert torch.equal(tracker.per_sample_sq_norms(), measured)
    with tracker as t:
        assert t is tracker and tracker.attached
    assert not tracker.attached


def test_no_capture_in_eval_or_no_grad_and_results_belong_to_caller():
    model, x, y, batch_loss, _ = make_case("mlp", 3, "sum")
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    with pytest.raises(RuntimeError, match="nothing measured yet"):
        tracker.per_sample_sq_norms()
    forward_backward(model, x, batch_loss)
    first = tracker.per_sample_sq_norms()
    first_copy = first.clone()
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    model.train()
    assert tracker._step is not None and not any(tracker._step.calls.values())
    torch.testing.assert_close(tracker.per_sample_sq_norms(), first_copy)
    first.zero_()  # the caller's tensor: changing it changes nothing inside
    torch.testing.assert_close(tracker.per_sample_sq_norms(), first_copy)
    x2 = torch.randn(3, 20)
    forward_backward(model, x2, batch_loss)
    assert not torch.equal(tracker.per_sample_sq_norms(), first_copy)
    assert torch.equal(first, torch.zeros(3))


def test_steady_memory_over_steps():
    model, x, y, batch_loss, _ = make_case("lm", 4, "mean")
    tracker = GradNoiseTracker(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for step in range(100):
        opt.zero_grad()
        forward_backward(model, x, batch_loss)
        tracker.per_sample_sq_norms()
        opt.step()
        if step in (10, 99):
            counts.append(live_tensors())
    assert counts[1] <= counts[0]
    assert not any(tracker._step.calls.values())
