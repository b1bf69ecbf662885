"""Which per-sample norm method is cheapest for a Linear layer's shape.

Python twin of ``linear_norm_costs`` / ``choose_linear_norm_method`` in
csrc/common.h (the compiled ops decide there; the reference and Triton
backends decide here, and a test checks that both agree).

Costs, in floating-point operations for one call (docs/design.md §2):
  goodfellow (T = 1)  2B(d + p)
  ghost               B(2T²(d + p) + 4T²)     two Gram matrices per sample
  fused, norms only   2BTdp                   the per-sample GEMM itself
  fused, with grad    4Bdp                    epilogue on top of the GEMM paid anyway
"""
from __future__ import annotations

FUSED_EPILOGUE_OPS_PER_ELEMENT = 4.0


def linear_norm_costs(B: int, T: int, d: int, p: int, with_weight_grad: bool) -> dict:
    goodfellow = 2.0 * B * (d + p) if T == 1 else float("inf")
    ghost = B * (2.0 * T * T * (d + p) + 4.0 * T * T)
    fused = (FUSED_EPILOGUE_OPS_PER_ELEMENT * B * d * p if with_weight_grad
             else 2.0 * B * T * d * p)
    return {"goodfellow": goodfellow, "ghost": ghost, "fused": fused}


def choose_linear_norm_method(B: int, T: int, d: int, p: int, with_weight_grad: bool) -> str:
    """The cheapest of 'goodfellow', 'ghost' and 'fused' for this call."""
    if T == 1:
        return "goodfellow"
    c = linear_norm_costs(B, T, d, p, with_weight_grad)
    return "ghost" if c["ghost"] < c["fused"] else "fused"
