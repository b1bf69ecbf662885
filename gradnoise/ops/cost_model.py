"""Which per-sample norm method is cheapest for a Linear layer's shape.

Python twin of ``linear_norm_costs`` / ``choose_linear_norm_method`` in
csrc/common.h (the compiled ops decide there; the reference and Triton
backends decide here, and a test checks that both agree).

Costs, in floating-point operations for one call (docs/design.md §2):
  goodfellow (T = 1)  2B(d + p)
  ghost               B(2T²(d + p) + 4T²·w)   two Gram matrices per sample
  fused, norms only   2BTdp + 2Bdp·(w − 1)    the per-sample GEMM itself
  fused, with grad    4Bdp·w                  epilogue on top of the GEMM paid anyway

w (`elementwise_weight`) is what one elementwise operation of an epilogue
costs in matrix flops. 1 on CPUs and CUDA cores, where the GEMM runs on the
same FMA units (the C++ twin's model, which counts the norms-only epilogue's
squares within 2BTdp); on tensor cores a matrix flop is
about 16 times cheaper than an FP32 operation in bf16/fp16 (H100: ≈ 990 dense
TFLOP/s against 67; A100: 312 against 19.5) and about 7 times in TF32, so the
Triton kernels pass that ratio (`tensor_core_weight`).
"""
from __future__ import annotations

import torch

FUSED_EPILOGUE_OPS_PER_ELEMENT = 4.0
#: matrix flops per FP32 elementwise operation on tensor cores (see the module doc)
TENSOR_CORE_WEIGHT = {torch.bfloat16: 16.0, torch.float16: 16.0, "tf32": 7.0}


def linear_norm_costs(B: int, T: int, d: int, p: int, with_weight_grad: bool,
                      elementwise_weight: float = 1.0) -> dict:
    w = elementwise_weight
    goodfellow = 2.0 * B * (d + p) if T == 1 else float("inf")
    ghost = B * (2.0 * T * T * (d + p) + 4.0 * T * T * w)
    fused = (FUSED_EPILOGUE_OPS_PER_ELEMENT * B * d * p * w if with_weight_grad
             else 2.0 * B * T * d * p + 2.0 * B * d * p * (w - 1.0))
    return {"goodfellow": goodfellow, "ghost": ghost, "fused": fused}


def choose_linear_norm_method(B: int, T: int, d: int, p: int, with_weight_grad: bool,
                              elementwise_weight: float = 1.0) -> str:
    """The cheapest of 'goodfellow', 'ghost' and 'fused' for this call."""
    if T == 1:
        return "goodfellow"
    c = linear_norm_costs(B, T, d, p, with_weight_grad, elementwise_weight)
    return "ghost" if c["ghost"] < c["fused"] else "fused"


def tensor_core_weight(dtype: torch.dtype, dot_precision: str, on_gpu: bool) -> float:
    """`elementwise_weight` for a Triton kernel: the tensor-core ratio for
    bf16/fp16 and TF32 products on a GPU, else 1."""
    if not on_gpu:
        return 1.0
    if dtype == torch.float32:
        return TENSOR_CORE_WEIGHT["tf32"] if dot_precision == "tf32" else 1.0
    return TENSOR_CORE_WEIGHT.get(dtype, 1.0)
