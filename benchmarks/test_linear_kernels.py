"""pytest-benchmark suite of the Linear kernels, each timed beside the plain
weight-gradient GEMM on the same inputs.

    python -m pytest benchmarks/test_linear_kernels.py --benchmark-columns=median,iqr,rounds

The ratio table with the targets is `python -m gradnoise bench` (interleaved
runs, which are fairer on a machine whose speed drifts).
"""
from __future__ import annotations

import pytest
import torch

from gradnoise import ops
from gradnoise.benchmarking.linear import SHAPES, candidates


@pytest.fixture(params=SHAPES, ids=lambda s: "B{}-T{}-d{}-p{}".format(*s))
def problem(request):
    B, T, d, p = request.param
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=gen) if T > 1 else torch.randn(B, d, generator=gen)
    grad_out = torch.randn(*x.shape[:-1], p, generator=gen)
    return x, grad_out


@pytest.mark.parametrize("name", ["gemm", "weight_grad_and_norms", "norms_only"])
def test_linear(benchmark, problem, name):
    x, grad_out = problem
    benchmark.group = "B{}-T{}-d{}-p{}".format(x.shape[0], x[0, ..., 0].numel(), x.shape[-1],
                                              grad_out.shape[-1])
    fn = candidates(x, grad_out)[name]
    result = benchmark.pedantic(fn, rounds=7, warmup_rounds=1)
    # The timed call must also be right: the weight gradient is the GEMM's.
    if name == "weight_grad_and_norms":
        torch.testing.assert_close(result[0], candidates(x, grad_out)["gemm"](),
                                   rtol=1e-4, atol=1e-3)
        assert result[2].shape == (x.shape[0],) and bool((result[2] >= 0).all())
