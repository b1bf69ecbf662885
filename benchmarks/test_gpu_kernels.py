"""pytest-benchmark suite of the Linear ops on a GPU, each beside cuBLAS's
weight-gradient GEMM on the same inputs, bf16 and fp32 (skips without CUDA).

    python -m pytest benchmarks/test_gpu_kernels.py --benchmark-columns=median,rounds

CUDA runs asynchronously, so each timed call ends with a synchronisation. The
ratio table with the targets, each result checked against cuBLAS's, is
`python -m gradnoise gpu-check`.
"""
from __future__ import annotations

import pytest
import torch

from gradnoise import ops
from gradnoise.benchmarking.gpu import LLM_SHAPES
from gradnoise.benchmarking.linear import SHAPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=[(s, dt) for dt in (torch.bfloat16, torch.float32)
                        for s in SHAPES + LLM_SHAPES],
                ids=lambda c: "B{}-T{}-d{}-p{}-".format(*c[0]) + str(c[1]).removeprefix("torch."))
def problem(request):
    (B, T, d, p), dtype = request.param
    gen = torch.Generator("cuda").manual_seed(0)
    lead = (B, T) if T > 1 else (B,)
    x = torch.randn(*lead, d, generator=gen, device="cuda", dtype=dtype)
    g = torch.randn(*lead, p, generator=gen, device="cuda", dtype=dtype)
    return x, g


def _synchronised(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("name", ["cuBLAS GEMM", "weight grad + norms", "norms only"])
def test_gpu_linear(benchmark, problem, name):
    x, g = problem
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    benchmark.group = f"{tuple(x.shape)} x {g.shape[-1]} {x.dtype}"
    fn = {"cuBLAS GEMM": lambda: g2.T @ x2,
          "weight grad + norms": lambda: ops.linear_weight_grad_and_sq_norms(x, g),
          "norms only": lambda: ops.linear_sq_norms(x, g)}[name]
    result = benchmark.pedantic(_synchronised(fn), rounds=10, warmup_rounds=2)
    if name == "weight grad + norms":
        want = (g2.T @ x2).float()
        err = (result[0].float() - want).abs().max().item()
        assert err <= 2.0 ** -6 * want.abs().max().item()
