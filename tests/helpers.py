"""What several test modules share: a zoo of small models with their cases,
and ground-truth helpers that do not use gradnoise (float64 loops over the
samples with plain autograd)."""
from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset
import torch.distributed as dist

import gradnoise

from gradnoise import GradNoiseTracker


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


def forward_backward(model, x, batch_loss):
    out = model(x)
    batch_loss(out).backward()
    return out


def plain_then_tracked(model, x, batch_loss, **tracker_args):
    """One step without the tracker and one with it: (output and gradients
    without, the tracker after its step), the output already checked bitwise."""
    out_plain = forward_backward(model, x, batch_loss)
    grads_plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with GradNoiseTracker(model, **tracker_args) as tracker:
        out_tracked = forward_backward(model, x, batch_loss)
    assert torch.equal(out_plain, out_tracked)
    return grads_plain, tracker


def loop_truth(model, x, sample_loss):
    """‖∇θ ℓ_i‖² by a float64 loop over the samples (plain autograd)."""
    m = copy.deepcopy(model).double()
    out = []
    for i in range(x.shape[0]):
        m.zero_grad()
        sample_loss(m(x[i:i + 1].double())).backward()
        out.append(sum(p.grad.square().sum() for p in m.parameters() if p.grad is not None))
    return torch.stack(out)


def copy_double(model):
    return copy.deepcopy(model).double()


# ------------------------------------------------------ kernel test variants
COMPILED = gradnoise._extension.compiled_status("cpu") is None


def cpu_supports(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return f" {flag}" in f.read()
    except OSError:
        return False


# (backend, instruction set of the fused kernel)
VARIANTS = [("reference", None)]
if COMPILED:
    VARIANTS.append(("cpu", "generic"))
    if cpu_supports("avx2") and cpu_supports("fma"):
        VARIANTS.append(("cpu", "avx2"))
    if cpu_supports("avx512f") and cpu_supports("avx512dq") and cpu_supports("avx512vl"):
        VARIANTS.append(("cpu", "avx512"))
VARIANT_IDS = [b if isa is None else f"{b}-{isa}" for b, isa in VARIANTS]

# Relative tolerances on the per-sample norms. The inputs of every dtype are
# exactly representable in float64, and the truth is computed from the very
# same (upcast) values, so only accumulation error is measured: float32 sums
# of up to ~10^4 products (≈ 1e-6 relative in practice), float64 ~1e-15.
# Half-precision inputs are accumulated in float32, hence the float32 bound.
NORM_RTOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# The weight gradient is returned in the input dtype: its rounding (half an
# ulp: 2^-8 for bfloat16, 2^-11 for float16) dominates, relative to the
# largest entry.
GRAD_RTOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2**-8, torch.float16: 2**-10}


# ------------------------------------------------------- noise-scale closed form
# A noisy linear regression whose noise scale has a closed form
D, DELTA_SQ, SIGMA = 8, 1.0, 1.0
TRUE_B_SIMPLE = (D * (DELTA_SQ + SIGMA ** 2) + DELTA_SQ) / DELTA_SQ  # 17


def regression_model(seed=0):
    """nn.Linear(d, 1) at w = w* + δ with ‖δ‖² = 1; returns (model, w*)."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(1, D, generator=gen, dtype=torch.float64)
    delta = torch.randn(1, D, generator=gen, dtype=torch.float64)
    delta = delta / delta.norm() * math.sqrt(DELTA_SQ)
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star + delta)
    return model, w_star


def regression_batch(gen, n, w_star):
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = x @ w_star.T + SIGMA * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return x, y


def loss_fn(model, x, y, reduction="mean"):
    r = 0.5 * (model(x) - y).square()
    return r.mean() if reduction == "mean" else r.sum()


# --------------------------------------------------------- adaptive and DDP
def index_dataset(n, d=3, seed=0):
    """(x, y, index) items of a noisy linear regression."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, 1, generator=gen)
    y = x @ w + 2.0 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y, torch.arange(n))


def leave_group() -> None:
    """End a rank that succeeded: wait until every rank is done with its
    collectives, then exit without tearing gloo down. Destroying the group
    while a peer's gloo threads still read from the socket can abort that peer
    ("terminate called without an active exception"); the OS closes the
    sockets instead. Results must be written before."""
    dist.barrier()
    os._exit(0)
