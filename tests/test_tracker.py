"""GradNoiseTracker on a zoo of models against torch.func per-sample
gradients in float64 (tests/ground_truth.py), plus its attach/detach and
step semantics."""
from __future__ import annotations

import gc
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradnoise import GradNoiseTracker
from gradnoise.layers import NormRule, register_rule
from tests.ground_truth import model_per_sample_sq_norms

RTOL = 2e-4  # float32 forward/backward against a float64 truth


# ---------------------------------------------------------------- the zoo
class MLP(nn.Module):
    def __init__(self, d_in=20, hidden=32, classes=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Pre-LN transformer block with attention written from nn.Linear."""

    def __init__(self, d, heads, norm=nn.LayerNorm):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = norm(d), norm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PositionalEmbedding(nn.Module):
    """A custom module holding a bare parameter: no rule, exact fallback."""

    def __init__(self, T, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)

    def forward(self, x):
        return x + self.pos[: x.shape[1]]


class TinyLM(nn.Module):
    def __init__(self, vocab=23, d=16, heads=2, T=9, blocks=2, norm=nn.LayerNorm):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = PositionalEmbedding(T, d)
        self.blocks = nn.Sequential(*[Block(d, heads, norm) for _ in range(blocks)])
        self.ln_f = norm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, idx):
        return self.head(self.ln_f(self.blocks(self.pos(self.embed(idx)))))


class CNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding="valid", groups=4), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.Conv2d(8, 6, 2, dilation=2, padding_mode="reflect", padding=1))
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class TiedWeights(nn.Module):
    """One weight in six places: two embeddings (one with padding_idx), a
    Linear head on positions called twice, one on pooled (2-D) input, and one
    with a bias of its own."""

    def __init__(self, V=11, d=6):
        super().__init__()
        self.e1 = nn.Embedding(V, d, padding_idx=1)
        self.e2 = nn.Embedding(V, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.pool_head = nn.Linear(d, V, bias=False)
        self.biased = nn.Linear(d, V)
        for m in (self.e2, self.head, self.pool_head, self.biased):
            m.weight = self.e1.weight

    def forward(self, idx):  # idx [B, T]
        h = torch.tanh(self.mix(self.e1(idx) + self.e2(idx.flip(1))))
        logits = self.head(h) + self.head(h * 0.5)
        return logits.mean(1) + self.pool_head(h.mean(1)) + self.biased(h).mean(1)


class Linear4D(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 2)

    def forward(self, x):  # x [B, 3, 4, 5]
        return self.b(torch.relu(self.a(x))).mean((1, 2))


class AttentionModel(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=False)
        return self.head(y.mean(1))


def classification_case(model, x, classes, reduction):
    y = torch.randint(0, classes, (x.shape[0],))

    def batch_loss(out):
        return F.cross_entropy(out, y, reduction=reduction)

    def sample_loss(out_i, y_i):  # ℓ_i; with "mean", ‖B·g_i‖² = ‖∇ℓ_i‖²
        return F.cross_entropy(out_i, y_i, reduction="sum")

    return y, batch_loss, sample_loss


def lm_case(model, idx, reduction):
    """Token-level cross-entropy with ignore_index; "mean" averages over every
    valid token of the batch, so g_i = (1/N) Σ_{t ∈ i} ∇ℓ_t."""
    y = torch.roll(idx, -1, 1)
    y[:, -1] = -100
    n_valid = (y != -100).sum().item()
    B = idx.shape[0]

    def batch_loss(out):
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100,
                               reduction=reduction)

    def sample_loss(out_i, y_i):
        s = F.cross_entropy(out_i.flatten(0, 1), y_i.flatten(), ignore_index=-100,
                            reduction="sum")
        return s * (B / n_valid) if reduction == "mean" else s

    return y, batch_loss, sample_loss


def make_case(name, B, reduction, seed=0):
    torch.manual_seed(seed)
    if name == "mlp":
        model, x = MLP(), torch.randn(B, 20)
        return (model, x) + classification_case(model, x, 5, reduction)
    if name == "lm":
        model = TinyLM()
        x = torch.randint(0, 23, (B, 9))
        x[:, -2] = 0  # padding tokens
        x[0, 1] = x[0, 3] = 7  # a repeated token
        return (model, x) + lm_case(model, x, reduction)
    if name == "lm_rms":
        model = TinyLM(norm=nn.RMSNorm)
        x = torch.randint(0, 23, (B, 9))
        return (model, x) + lm_case(model, x, reduction)
    if name == "cnn":
        model, x = CNN(), torch.randn(B, 3, 10, 10)
        return (model, x) + classification_case(model, x, 4, reduction)
    if name == "shared":
        model, x = SharedModule(), torch.randn(B, 6)
        return (model, x) + classification_case(model, x, 3, reduction)
    if name == "tied":
        model = TiedWeights()
        x = torch.randint(0, 11, (B, 7))
        x[:, 2] = 1  # padding tokens of e1
        x[0, 0] = x[0, 4] = 5  # a repeated token
        return (model, x) + classification_case(model, x, 11, reduction)
    if name == "linear4d":
        model, x = Linear4D(), torch.randn(B, 3, 4, 5)
        return (model, x) + classification_case(model, x, 2, reduction)
    if name == "mha":
        model, x = AttentionModel(), torch.randn(B, 5, 8)
        return (model, x) + classification_case(model, x, 3, reduction)
    raise KeyError(name)


ZOO = ["mlp", "lm", "lm_rms", "cnn", "shared", "tied", "linear4d", "mha"]


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


# ------------------------------------------------------------ semantics
def _forward_backward(model, x, batch_loss):
    out = model(x)
    batch_loss(out).backward()
    return out


def _plain_then_tracked(model, x, batch_loss, **tracker_args):
    """One step without the tracker and one with it: (output and gradients
    without, the tracker after its step), the output already checked bitwise."""
    out_plain = _forward_backward(model, x, batch_loss)
    grads_plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with GradNoiseTracker(model, **tracker_args) as tracker:
        out_tracked = _forward_backward(model, x, batch_loss)
    assert torch.equal(out_plain, out_tracked)
    return grads_plain, tracker


@pytest.mark.parametrize("name", ["lm", "cnn"])
def test_outputs_unchanged_and_grads_match(name):
    model, x, y, batch_loss, _ = make_case(name, 4, "mean")
    grads_plain, tracker = _plain_then_tracked(model, x, batch_loss)
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
    from gradnoise.layers.shared import Factor, cross_sq_norms
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
    grads_plain, _ = _plain_then_tracked(model, x, batch_loss, fused_backward=False)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_plain[n]), n


def test_two_dimensional_linear_keeps_autograd_backward_bitwise():
    """With one position per sample the Linear norms cost O(B(d + p)) and
    come from the output gradient: the weight gradients stay autograd's."""
    model, x, y, batch_loss, sample_loss = make_case("mlp", 5, "mean")
    truth = model_per_sample_sq_norms(model, x, y, sample_loss)
    grads_plain, tracker = _plain_then_tracked(model, x, batch_loss)
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
    _forward_backward(model, x, batch_loss)
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
    _forward_backward(model, x, batch_loss)
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
    _forward_backward(model, x2, batch_loss)
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
        _forward_backward(model, x, batch_loss)
        tracker.per_sample_sq_norms()
        opt.step()
        if step in (10, 99):
            counts.append(live_tensors())
    assert counts[1] <= counts[0]
    assert not any(tracker._step.calls.values())


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


# ------------------------------------------------ what a training loop also does
def _penalised_step(model, x):
    """A gradient penalty: ‖∂out/∂x‖² differentiated again (create_graph)."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x).sum()
    gx, = torch.autograd.grad(out, x, create_graph=True)
    (out + gx.square().sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["layer", "rms", "group"])
def test_double_backward_gives_autograds_gradients_and_is_not_measured(norm):
    torch.manual_seed(0)
    if norm == "group":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                              nn.Linear(16, 1))
        x = torch.randn(3, 2, 4, 4)
    else:
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4) if norm == "layer" else nn.RMSNorm(4),
                              nn.Tanh(), nn.Linear(4, 1))
        x = torch.randn(3, 4)
    plain = _penalised_step(model, x)
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules
    tracked = _penalised_step(model, x)
    for n in plain:
        torch.testing.assert_close(tracked[n], plain[n], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="create_graph"):
        tracker.per_sample_sq_norms()
    # an ordinary step afterwards is measured again
    model.zero_grad()
    model(x).sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)


def test_copies_of_a_tracked_model_run_their_own_weights_and_pickle():
    import copy
    import io
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.zero_()
    x = torch.randn(3, 5, 4)
    assert torch.equal(copied(x), torch.zeros(3, 5, 2))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    # the tracker still measures the original, and only it
    model(x).square().sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)
    copied(x).sum().backward()
    assert tracker.per_sample_sq_norms().shape == (3,)


def test_two_trackers_on_one_model_both_measure_and_detach_their_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x = torch.randn(5, 2, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.square().sum(),
                                      params=["1.weight", "1.bias"])
    norm_only = GradNoiseTracker(model, layers="norm", loss_reduction="sum")
    every = GradNoiseTracker(model, loss_reduction="sum")
    model(x).square().sum().backward()
    torch.testing.assert_close(norm_only.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(every.per_layer_sq_norms()["1"].double(), truth, rtol=1e-5, atol=0)
    every.detach()
    assert norm_only.attached and "forward" in model[1].__dict__
    norm_only.detach()
    assert not any("forward" in m.__dict__ for m in model.modules())
    # a module taken over by another tracker while this one was detached
    first = GradNoiseTracker(model)
    first.detach()
    second = GradNoiseTracker(model)
    with pytest.raises(ValueError, match="already measured by another"):
        first.attach()
    assert not first.attached and second.attached
    assert all("forward" in model[k].__dict__ for k in (0, 2))


def test_forward_replaced_on_the_instance_is_kept():
    import functools
    lin = nn.Linear(4, 4)
    lin.forward = functools.partial(lambda x, f: f(x) * 2.0, f=lin.forward)
    model = nn.Sequential(lin, nn.Linear(4, 2))
    x = torch.randn(3, 5, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.sum())
    before = model(x)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    # '0' runs its replaced forward, measured from its functional calls
    assert tracker.fused_modules == ["1"] and tracker.fallback_modules == []
    out = model(x)
    assert torch.equal(out, before)
    out.sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)
    tracker.detach()
    assert torch.equal(model(x), before) and "forward" in lin.__dict__


def test_layers_called_by_keyword():
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.norm = nn.RMSNorm(3)

        def forward(self, x):
            return self.norm(x=self.fc(input=x))

    torch.manual_seed(0)
    model = ByKeyword()
    x = torch.randn(2, 5, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.square().sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    assert set(tracker.fused_modules) == {"fc", "norm"}
    model(x).square().sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_modules_in_eval_mode_inside_a_training_forward_are_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[1].eval()
    x = torch.randn(3, 4)
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model(x).sum().backward()
    assert set(tracker.per_layer_sq_norms()) == {"0", "1", "2"}
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_parameter_shared_with_an_untracked_module_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.mix(self.emb(idx))))

    with pytest.raises(ValueError, match=r"\['emb'\] is also used by \['head'\]"):
        GradNoiseTracker(Tied(), layers=lambda name, m: name == "emb")
    GradNoiseTracker(Tied(), layers=lambda name, m: name in ("emb", "head")).detach()


class _SharedQuery(nn.Module):
    """`mod` called on the batch and on a tensor of `rows` rows shared by every sample."""
    def __init__(self, mod, rows):
        super().__init__()
        self.mod = mod
        self.register_buffer("q", torch.randn(rows, 4, 5, generator=torch.Generator().manual_seed(3)))
        self.head = nn.Linear(20, 2)

    def forward(self, x):
        shared = self.mod(self.q)
        if shared.shape[0] != 1:
            shared = shared.mean(0, keepdim=True)
        return self.head((self.mod(x) * shared).flatten(1))


@pytest.mark.parametrize("mod, kw, rows", [(nn.Linear(5, 5), {}, 1), (nn.Linear(5, 5), {}, 2),
                                           (nn.Linear(5, 5), dict(fused_backward=False), 2),
                                           (nn.GroupNorm(2, 4), dict(fused_backward=False), 1),
                                           (nn.GroupNorm(2, 4), {}, 1),
                                           (nn.BatchNorm1d(4).eval(), {}, 1)],
                         ids=["linear", "linear-2-rows", "linear-2-rows-hooked", "groupnorm",
                              "groupnorm-fused", "batchnorm-eval"])
def test_a_module_called_on_the_batch_and_on_an_input_shared_by_every_sample(mod, kw, rows):
    """The call on the shared input broadcasts over the batch: sample i's
    share of its gradient is the part that flows into sample i's outputs."""
    model = _SharedQuery(mod, rows)
    x, y = torch.randn(3, 4, 5), torch.randn(3, 2)
    truth = model_per_sample_sq_norms(model, x, y, lambda o, t: ((o - t) ** 2).sum())
    plain = model(x)
    with GradNoiseTracker(model, loss_reduction="sum", **kw) as tracker:
        out = model(x)
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-7)
        ((out - y) ** 2).sum().backward()
        assert tracker.fallback_modules == []
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=1e-6)


def test_a_shared_input_of_several_rows_is_refused_where_rows_cannot_be_split():
    for mod, kw in [(nn.GroupNorm(2, 4), dict(fused_backward=False)), (nn.GroupNorm(2, 4), {}),
                    (nn.BatchNorm1d(4).eval(), {})]:
        model = _SharedQuery(mod, rows=2)
        tracker = GradNoiseTracker(model, **kw)
        with pytest.raises(RuntimeError, match=r"module 'mod' .* input of 2 rows along dim 0 in "
                                               r"a batch of 3"):
            model(torch.randn(3, 4, 5)).sum().backward()
        tracker.detach()


def test_batchnorm_with_batch_statistics_in_eval_mode_is_refused_and_all_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False),
                          nn.Linear(4, 2))
    model[1].eval()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        GradNoiseTracker(model)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 3),
                          nn.BatchNorm1d(3, affine=False))
    model.eval()
    model[0].train()
    model[3].train()
    GradNoiseTracker(model)
    model.train()
    with pytest.raises(RuntimeError, match=r"'1' \(BatchNorm1d\), '4' \(BatchNorm1d\)"):
        model(torch.randn(4, 2, 4))


def test_attention_masks_shared_and_per_sample():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x, mask):
            return self.head(self.mha(x, x, x, attn_mask=mask, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    # a causal [T, T] mask with T = B, and a per-sample [B·heads, T, T] one
    for B, T, mask in [(4, 4, nn.Transformer.generate_square_subsequent_mask(4)),
                       (3, 5, torch.randn(6, 5, 5))]:
        model = Attend()
        x = torch.randn(B, T, 8)
        tracker = GradNoiseTracker(model, loss_reduction="sum")
        model(x, mask).square().sum().backward()
        tracker.detach()
        truth = []
        for i in range(B):
            model.zero_grad()
            m_i = mask if mask.dim() == 2 else mask.reshape(B, 2, T, T)[i]
            model.double()(x[i:i + 1].double(), m_i.double()).square().sum().backward()
            truth.append(sum(p.grad.square().sum() for p in model.parameters()))
            model.float()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), torch.stack(truth),
                                   rtol=1e-4, atol=0)


class _BiasedMix(nn.Module):
    """A fallback module that takes one of the model's buffers as an input."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d) * 0.5)

    def forward(self, x, bias):
        return ((x * self.w) @ x.transpose(1, 2) + bias).softmax(-1) @ x


class _BufferAsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = _BiasedMix(3)
        self.register_buffer("bias", torch.randn(4, 4))

    def forward(self, x):
        # a view of the buffer, as a causal mask sliced to the length is
        return self.mix(x, self.bias[:x.shape[1], :x.shape[1]]).mean(1).sum(1)


def test_fallback_keeps_the_models_own_tensors_shared_whatever_their_dim_0():
    torch.manual_seed(1)
    model = _BufferAsInput()
    x = torch.randn(4, 4, 3)                              # B = T = 4 = the buffer's dim 0
    truth = model_per_sample_sq_norms(model, x, torch.zeros(x.shape[0]), lambda o, t: o.sum())
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model(x).sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def test_fallback_refuses_what_it_cannot_recompute_with_the_modules_name():
    from torch.nn.utils.parametrizations import weight_norm

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[1][-1])          # h_n: [layers, B, H]

    model = Recurrent()
    GradNoiseTracker(model)
    with pytest.raises(ValueError, match=r"module 'rnn' \(GRU\).*dim 0 is not the batch"):
        model(torch.randn(3, 6, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"'0' .*parametrized"):
        GradNoiseTracker(nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match=r"'0.self_attn' \(MultiheadAttention\) has dropout 0.1"):
        GradNoiseTracker(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)))

    class Noisy(nn.Module):          # cumsum of its parameter: the fallback re-runs it
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.w.cumsum(0))

    model = nn.Sequential(Noisy())
    GradNoiseTracker(model)
    with pytest.raises(ValueError, match=r"'0.drop' \(Dropout\) has dropout 0.5"):
        model(torch.randn(3, 4)).sum().backward()

    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return F.dropout(x * self.w.cumsum(0), 0.5, self.training)

    model = nn.Sequential(FunctionalDropout())
    GradNoiseTracker(model)
    with pytest.raises(RuntimeError, match=r"module '0' \(FunctionalDropout\).*random"):
        model(torch.randn(3, 4)).sum().backward()


def test_dropout_after_a_captured_use_is_measured_exactly():
    """x·w then dropout: sample i's gradient of w is Σ_j c_j m_ij x_ij / (1 − p),
    with the step's own mask m read off the output."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 2.0, 4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.w)

    model = nn.Sequential(Noisy(), nn.Linear(4, 1, bias=False))
    model[1].requires_grad_(False)
    x = torch.randn(6, 4)
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).sum().backward()
        hidden = seen[-1]
        assert tracker.fallback_modules == []
        kept = (hidden != 0).double() / 0.5
        truth = (model[1].weight.double() * kept * x.double()).square().sum(1)
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=0)


def test_a_dropped_tracker_keeps_nothing_alive():
    import weakref
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules
    refs = weakref.ref(model), weakref.ref(tracker)
    del model, tracker
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_loaded_copy_of_a_tracked_model_is_planned_as_a_fresh_one():
    import copy
    import io
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    GradNoiseTracker(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        tracker = GradNoiseTracker(other)
        assert tracker.fused_modules == ["0", "1", "2"] and not tracker.fallback_modules
        assert GradNoiseTracker(other, layers="norm").tracked_modules == ["1"]
        tracker.detach()


def test_double_backward_under_autocast_through_fused_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 5, 4)

    def step():
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi).float().sum()
        gx, = torch.autograd.grad(out, xi, create_graph=True)
        (out + gx.square().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = step()
    tracker = GradNoiseTracker(model)
    assert tracker.fused_modules == ["0", "2"]
    tracked = step()
    for n in plain:
        # the same bfloat16 products, summed in another order
        torch.testing.assert_close(tracked[n], plain[n], rtol=1.6e-2, atol=1e-3)


def test_fallback_shared_tensors_follow_the_model_after_it_is_converted():
    torch.manual_seed(1)

    model = _BufferAsInput()
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    tracker = GradNoiseTracker(model, loss_reduction="sum")
    model.double()                                        # new buffer and parameter objects
    truth = model_per_sample_sq_norms(model, x, torch.zeros(4), lambda o, t: o.sum())
    model(x).sum().backward()
    torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5, atol=0)


def _loop_truth(model, x, sample_loss):
    """‖∇θ ℓ_i‖² by a float64 loop over the samples (plain autograd)."""
    import copy
    m = copy.deepcopy(model).double()
    out = []
    for i in range(x.shape[0]):
        m.zero_grad()
        sample_loss(m(x[i:i + 1].double())).backward()
        out.append(sum(p.grad.square().sum() for p in m.parameters() if p.grad is not None))
    return torch.stack(out)


class _Chunky(nn.Module):          # a parameter split into pieces: the fallback
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        a, b = self.w.chunk(2)
        return x * self.w + torch.cat([x[:, :2] * a, x[:, 2:] * b], 1)


class _SetItem(nn.Module):         # a parameter written into a tensor: the fallback
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = x * self.w
        z = torch.zeros(x.shape[0], 8, dtype=x.dtype)
        z[:, 4:] = self.w
        return torch.cat([y, y], 1) * z


class _SelfTranspose(nn.Module):   # transpose(0, 0) is no transpose
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("c", torch.tensor(2.0))

    def forward(self, x):
        return F.linear(x, self.W.transpose(0, 0)) * self.c + F.linear(x, self.W)


@pytest.mark.parametrize("cls", [_Chunky, _SetItem, _SelfTranspose])
def test_uses_of_a_parameter_the_capture_does_not_cover_are_never_missed(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), cls())
    x = torch.randn(3, 4)
    truth = _loop_truth(model, x, lambda o: o.square().sum())
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).square().sum().backward()
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=0)
        assert (tracker.fallback_modules == ["1"]) == (cls is not _SelfTranspose)


def test_a_module_whose_second_call_falls_back_leaves_that_step_unmeasured():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x, odd=False):
            return x * self.w if not odd else x * self.w.cumsum(0)

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.m = Switch()

        def forward(self, x):
            h = self.lin(x)
            return self.m(h) + self.m(h, odd=True)

    torch.manual_seed(0)
    model = TwoCalls()
    x = torch.randn(3, 4)
    truth = _loop_truth(model, x, lambda o: o.square().sum())
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        model(x).square().sum().backward()
        with pytest.raises(RuntimeError, match=r"module 'm' \(Switch\) was called several times"):
            tracker.per_sample_sq_norms()
        model.zero_grad()
        model(x).square().sum().backward()        # the next step: all by the fallback
        torch.testing.assert_close(tracker.per_sample_sq_norms().double(), truth, rtol=1e-5,
                                   atol=0)


def test_dropout_on_a_shared_tensor_is_replayed_with_the_steps_mask():
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(11, 6), nn.Embedding(5, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, idx):
            p = F.dropout(self.pos(torch.arange(idx.shape[1])[None]), 0.5, training=True)
            return self.head(self.tok(idx) + p)

    torch.manual_seed(0)
    model = Pos()
    idx = torch.randint(0, 11, (4, 5))
    with GradNoiseTracker(model, loss_reduction="sum") as tracker:
        torch.manual_seed(1)
        model(idx).square().sum().backward()
        got = tracker.per_layer_sq_norms()["pos"].double()
    after = torch.get_rng_state()
    # the truth, with the same mask: sample i's gradient of pos alone
    torch.manual_seed(1)
    m = copy_double(model)
    mask = F.dropout(torch.ones(1, 5, 6, dtype=torch.float64), 0.5, training=True)
    truth = []
    for i in range(4):
        m.zero_grad()
        h = m.tok(idx[i:i + 1]) + m.pos(torch.arange(5)[None]) * mask
        m.head(h).square().sum().backward()
        truth.append(m.pos.weight.grad.square().sum())
    torch.testing.assert_close(got, torch.stack(truth), rtol=1e-5, atol=0)
    torch.manual_seed(1)
    F.dropout(torch.ones(1, 5, 6), 0.5, training=True)
    assert torch.equal(after, torch.get_rng_state()), "backward moved the RNG"


def copy_double(model):
    import copy
    return copy.deepcopy(model).double()
