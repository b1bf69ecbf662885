"""The Linear-kernel benchmark: each op against the plain weight-gradient GEMM
grad_out.reshape(-1, p).T @ x.reshape(-1, d) on the same inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..ops import fusion
from ..ops.backends import resolve_backend
from ..ops.linear import op_family
from ..ops.cost_model import choose_linear_norm_method
from .timing import interleaved_times, median_ratio

# (B, T, d, p): an MLP layer, transformer layers at three sequence lengths,
# and a wide-output layer with short sequences.
SHAPES = [(256, 1, 1024, 1024), (16, 128, 768, 768), (16, 512, 768, 768),
          (4, 2048, 1024, 1024), (64, 64, 256, 1024)]

# Targets of the C++ CPU path: fused op ≤ 1.10× the GEMM (≤ 1.06× for
# T ≥ 512); norms alone at T = 1 ≤ 0.05× the GEMM.
def fused_target(T: int) -> float:
    return 1.06 if T >= 512 else 1.10


NORMS_T1_TARGET = 0.05


@dataclass
class LinearRow:
    B: int
    T: int
    d: int
    p: int
    gemm_ms: float
    gemm_gflops: float
    weight_grad_and_norms: float  # ratio to the GEMM, method "auto"
    method: str                   # the norms method "auto" chose
    norms_only: float             # ratio to the GEMM, linear_sq_norms "auto"
    path: str = ""                # fused kernel or GEMM + norms (gradnoise.ops.fusion)

    @property
    def target(self) -> float:
        return fused_target(self.T)


def candidates(x: torch.Tensor, grad_out: torch.Tensor, backend: str | None = None):
    d, p = x.shape[-1], grad_out.shape[-1]
    x2, g2 = x.reshape(-1, d), grad_out.reshape(-1, p)
    return {
        "gemm": lambda: g2.T @ x2,
        "weight_grad_and_norms": lambda: ops.linear_weight_grad_and_sq_norms(
            x, grad_out, backend=backend),
        "norms_only": lambda: ops.linear_sq_norms(x, grad_out, backend=backend),
    }


def bench_shape(B: int, T: int, d: int, p: int, repeats: int = 15, backend: str | None = None,
                on_repeat=None) -> LinearRow:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=gen) if T > 1 else torch.randn(B, d, generator=gen)
    grad_out = torch.randn(*x.shape[:-1], p, generator=gen)
    times = interleaved_times(candidates(x, grad_out, backend), repeats, on_repeat=on_repeat)
    gemm = sorted(times["gemm"])[len(times["gemm"]) // 2]
    method = choose_linear_norm_method(B, T, d, p, with_weight_grad=True)
    be = resolve_backend(x.device, backend, op_family(x))
    path = fusion.chosen_path(be, x, B, T, d, p, with_bias=False)
    return LinearRow(B, T, d, p, gemm * 1e3, 2 * B * T * d * p / gemm / 1e9,
                     median_ratio(times, "weight_grad_and_norms", "gemm"), method,
                     median_ratio(times, "norms_only", "gemm"),
                     "fused" if path == "fused" else "GEMM + norms")
