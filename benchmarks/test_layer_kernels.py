"""pytest-benchmark suite of the convolution and normalisation-layer kernels on
the benchmark CNN's and LM's layers, each timed beside the backward torch runs
without gradnoise (the peer it replaces):

- conv: `conv_weight_grad_and_sq_norms` against torch's convolution weight
  gradient (`aten.convolution_backward` for the weight and bias);
- GroupNorm / LayerNorm: the whole backward with the norms against torch's
  `native_group_norm_backward` / `native_layer_norm_backward`.

    python -m pytest benchmarks/test_layer_kernels.py --benchmark-columns=median,iqr,rounds

Each timed call is also checked against the call it replaces.
"""
from __future__ import annotations

import pytest
import torch

from gradnoise import ops

# (B, C_in, C_out, H, stride): the three convolutions of the benchmark CNN
CONVS = [(64, 3, 32, 32, 1), (64, 32, 64, 32, 2), (64, 64, 64, 16, 2)]
# (B, C, H, groups): its three GroupNorms
GROUP_NORMS = [(64, 32, 32, 8), (64, 64, 16, 8), (64, 64, 8, 8)]
# (B, T, C): the LM's LayerNorms, and a wider one
LAYER_NORMS = [(16, 128, 256), (16, 512, 768)]


@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "B{}-C{}-O{}-H{}-s{}".format(*s))
@pytest.mark.parametrize("name", ["torch weight grad", "gradnoise weight grad + norms"])
def test_conv(benchmark, shape, name):
    B, C, O, H, stride = shape
    benchmark.group = "conv B{}-C{}-O{}-H{}-s{}".format(*shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, H, generator=gen)
    w = torch.randn(O, C, 3, 3, generator=gen) * 0.1
    g = torch.randn(B, O, (H - 1) // stride + 1, (H - 1) // stride + 1, generator=gen)

    def torch_grad(x=x, g=g, w=w):
        return torch.ops.aten.convolution_backward(g, x, w, [O], [stride] * 2, [1, 1], [1, 1],
                                                   False, [0, 0], 1, [False, True, True])

    def fused():
        return ops.conv_weight_grad_and_sq_norms(x, g, 3, stride, 1, 1, 1, with_bias=True)

    result = benchmark.pedantic(torch_grad if name.startswith("torch") else fused, rounds=7,
                                warmup_rounds=1)
    if not name.startswith("torch"):
        # Against float64 truth: a float32 sum of B·H'·W' products is off by a
        # fraction of ε·Σ|terms| (torch's own float32 result by up to ~0.8 of it
        # here), so that is the scale of the check, not torch's float32 result.
        _, gw, gb = torch_grad(x.double(), g.double(), w.double())
        _, gw_mag, gb_mag = torch_grad(x.double().abs(), g.double().abs(), w.double())
        eps = torch.finfo(torch.float32).eps
        assert bool(((result[0].double() - gw).abs() <= 0.25 * eps * gw_mag).all())
        assert bool(((result[1].double() - gb).abs() <= 0.25 * eps * gb_mag).all())
        assert result[2].shape == (B,) and bool((result[2] > 0).all())


@pytest.mark.parametrize("shape", GROUP_NORMS, ids=lambda s: "B{}-C{}-H{}-G{}".format(*s))
@pytest.mark.parametrize("name", ["torch backward", "gradnoise backward + norms"])
def test_group_norm(benchmark, shape, name):
    B, C, H, G = shape
    benchmark.group = "group norm B{}-C{}-H{}-G{}".format(*shape)
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(B, C, H, H, generator=gen), torch.randn(B, C, H, H, generator=gen)
    gamma, beta = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, gamma, beta, B, C, H * H, G, 1e-5)

    def torch_backward():
        return torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, gamma, B, C, H * H, G,
                                                         [True, True, True])

    def fused():
        return ops.group_norm_backward_and_sq_norms(x, dy, mean, rstd, gamma, G, 1e-5)

    result = benchmark.pedantic(torch_backward if name.startswith("torch") else fused, rounds=7,
                                warmup_rounds=1)
    if not name.startswith("torch"):
        for ours, theirs in zip(result[:3], torch_backward()):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", LAYER_NORMS, ids=lambda s: "B{}-T{}-C{}".format(*s))
@pytest.mark.parametrize("name", ["torch backward", "gradnoise backward + norms"])
def test_layer_norm(benchmark, shape, name):
    B, T, C = shape
    benchmark.group = "layer norm B{}-T{}-C{}".format(*shape)
    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn(B, T, C, generator=gen), torch.randn(B, T, C, generator=gen)
    gamma, beta = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], gamma, beta, 1e-5)

    def torch_backward():
        return torch.ops.aten.native_layer_norm_backward(dy, x, [C], mean, rstd, gamma, beta,
                                                         [True, True, True])

    def fused():
        return ops.layer_norm_backward_and_sq_norms(x, dy, C, 1e-5, weight=gamma)

    result = benchmark.pedantic(torch_backward if name.startswith("torch") else fused, rounds=7,
                                warmup_rounds=1)
    if not name.startswith("torch"):
        for ours, theirs in zip(result[:3], torch_backward()):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
