"""Linear layer ops: y = x Wᵀ + b with input X_i [T, d] and output gradient
dY_i [T, p] of sample i; the per-sample weight gradient is G_i = dY_iᵀ X_i and
the bias gradient is Σ_t dY_i,t. The ops return, per sample,

    ‖G_i‖²_F (+ ‖Σ_t dY_i,t‖² with the bias),

accumulated in float32 (float64 for float64 input), and optionally Σ_i G_i.
Here: the dispatch to a backend, the pure-PyTorch reference twins, and the
shapes of the compiled ops for fake tensors (torch.compile, torch.export).
Arguments are checked by `_validate.linear_problem`, which the fakes share.
"""
from __future__ import annotations

import torch

from . import _validate, fusion
from .backends import resolve_backend
from .cost_model import choose_linear_norm_method

__all__ = ["linear_sq_norms", "linear_weight_grad_and_sq_norms", "linear_sq_norms_ref",
           "linear_weight_grad_and_sq_norms_ref"]


def linear_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool = False,
                    method: str = "auto", backend: str | None = None) -> torch.Tensor:
    """Per-sample squared gradient norms of a Linear layer, without the gradients.

    For x [B, *, d] and grad_out [B, *, p] (T = product of the middle dims),
    returns n [B] with n_i = ‖dY_iᵀ X_i‖²_F (+ ‖Σ_t dY_i,t‖² if ``with_bias``),
    i.e. the squared norm of sample i's gradient of the weight (and bias).

    method: "goodfellow" (T = 1, Goodfellow 2015), "ghost" (Gram matrices,
    Li et al. 2021), "fused" (per-sample GEMM tiles, squared in registers) or
    "auto" (cheapest by the cost model, decided on every call).
    Accumulates in float32 (float64 for float64 input) and returns that dtype.
    "ghost" sums products of Gram-matrix entries, so its error is relative to
    Σ_ts |x_t·x_s||dy_t·dy_s| rather than to the result: for a sample whose
    gradient nearly cancels over its T positions, "fused" is more accurate.
    """
    _validate.linear_problem(x, grad_out, method)
    be = resolve_backend(x.device, backend, op_family(x))
    if be == "reference":
        return linear_sq_norms_ref(x, grad_out, with_bias, method)
    if be == "triton":
        from .triton import linear as triton_linear
        return triton_linear.linear_sq_norms(x, grad_out, with_bias, method)
    return torch.ops.gradnoise.linear_sq_norms(x, grad_out, with_bias, method)


def linear_weight_grad_and_sq_norms(x: torch.Tensor, grad_out: torch.Tensor,
                                    with_bias: bool = False, method: str = "auto",
                                    backend: str | None = None):
    """The weight gradient and the per-sample norms in one pass.

    Returns (grad_weight [p, d], grad_bias [p] or None, sq_norms [B]) where
    grad_weight = Σ_i dY_iᵀ X_i = grad_out.reshape(-1, p).T @ x.reshape(-1, d),
    and sq_norms is as in :func:`linear_sq_norms`. The "fused" method reads X
    and dY once and never holds more than a tile of a per-sample gradient, so
    it can stand in for the weight-gradient GEMM of backward. With "auto" the
    backend's op runs where it was measured at least as fast as torch's GEMM
    plus the norms-only op on this device and shape, and that pair runs
    otherwise (gradnoise.ops.fusion).
    Gradients have the input dtype; norms are float32 (float64 for float64).
    """
    B, T, d, p = _validate.linear_problem(x, grad_out, method)
    be = resolve_backend(x.device, backend, op_family(x))
    if be == "reference":
        return linear_weight_grad_and_sq_norms_ref(x, grad_out, with_bias, method)

    def fused():
        return backend_weight_grad_and_sq_norms(be, x, grad_out, with_bias, method)

    def separate():
        return _vendor_gemm_and_sq_norms(be, x, grad_out, with_bias, B * T)

    if method != "auto":
        return fused()
    path = fusion.weight_grad_path(be, x, B, T, d, p, with_bias, fused, separate)
    return fused() if path == "fused" else separate()


def backend_weight_grad_and_sq_norms(be, x, grad_out, with_bias, method):
    """The backend's own op: for "fused", one pass for the gradient and the norms."""
    if be == "triton":
        from .triton import linear as triton_linear
        gw, gb, n = triton_linear.linear_weight_grad_and_sq_norms(x, grad_out, with_bias, method)
    else:
        gw, gb, n = torch.ops.gradnoise.linear_weight_grad_and_sq_norms(
            x, grad_out, with_bias, method)
    return gw, (gb if with_bias else None), n


def _vendor_gemm_and_sq_norms(be, x, grad_out, with_bias, rows):
    """The weight gradient from torch's GEMM (cuBLAS, MKL: what autograd's
    backward runs) and the norms from the backend's norms-only op beside it."""
    norms = linear_sq_norms(x, grad_out, with_bias, "auto", be)
    g2 = grad_out.reshape(rows, grad_out.shape[-1])
    grad_weight = g2.T @ x.reshape(rows, x.shape[-1])
    return grad_weight, (g2.sum(0) if with_bias else None), norms


# ------------------------------------------------------- reference twins
# Bound on the temporary memory of one chunk of samples (per-sample gradients
# or Gram matrices), so that the reference never needs O(B·d·p) memory.
_CHUNK_BYTES = 64 * 2**20


def op_family(x: torch.Tensor) -> str:
    """"linear_matrix" with positions (T > 1: matrix products), else "linear_rows"."""
    return "linear_matrix" if x.dim() > 2 and x.numel() > x.shape[0] * x.shape[-1] else \
        "linear_rows"


def _as_3d(x: torch.Tensor, grad_out: torch.Tensor, T: int, acc: torch.dtype):
    B = x.shape[0]
    return (x.reshape(B, T, x.shape[-1]).to(acc),
            grad_out.reshape(B, T, grad_out.shape[-1]).to(acc))


def _sample_chunks(B: int, bytes_per_sample: int):
    step = max(1, _CHUNK_BYTES // max(1, bytes_per_sample))
    for start in range(0, B, step):
        yield slice(start, min(B, start + step))


def _goodfellow(x3, g3):
    """T = 1: ‖dy_i x_iᵀ‖² = ‖x_i‖²·‖dy_i‖² (Goodfellow 2015)."""
    return x3.square().sum((1, 2)) * g3.square().sum((1, 2))


def _ghost(x3, g3):
    """‖G_i‖² = ⟨X_i X_iᵀ, dY_i dY_iᵀ⟩_F (Li et al. 2021), in chunks of samples."""
    B, T, _ = x3.shape
    out = x3.new_empty(B)
    for s in _sample_chunks(B, 2 * T * T * x3.element_size()):
        gram_x = torch.bmm(x3[s], x3[s].transpose(1, 2))
        gram_g = torch.bmm(g3[s], g3[s].transpose(1, 2))
        out[s] = (gram_x * gram_g).sum((1, 2))
    return out


def _materialized(x3, g3):
    """Form G_i = dY_iᵀ X_i for a chunk of samples and square it."""
    B, _, d = x3.shape
    p = g3.shape[-1]
    out = x3.new_empty(B)
    for s in _sample_chunks(B, d * p * x3.element_size()):
        out[s] = torch.bmm(g3[s].transpose(1, 2), x3[s]).square().sum((1, 2))
    return out


def linear_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool = False,
                        method: str = "auto") -> torch.Tensor:
    """Per-sample ‖dY_iᵀ X_i‖²_F (+ ‖Σ_t dY_i,t‖²), shape [B]."""
    B, T, d, p = _validate.linear_problem(x, grad_out, method)
    acc = _validate.accumulation_dtype(x.dtype)
    x3, g3 = _as_3d(x, grad_out, T, acc)
    if method == "auto":
        method = choose_linear_norm_method(B, T, d, p, with_weight_grad=False)
    if method == "goodfellow":
        norms = _goodfellow(x3, g3)
    elif method == "ghost":
        norms = _ghost(x3, g3)
    else:
        norms = _materialized(x3, g3)
    if with_bias:
        norms = norms + g3.sum(1).square().sum(1)
    return norms


def linear_weight_grad_and_sq_norms_ref(x: torch.Tensor, grad_out: torch.Tensor,
                                        with_bias: bool = False, method: str = "auto"):
    """(Σ_i G_i [p, d], Σ_i,t dY_i,t [p] or None, per-sample norms [B]).

    Gradients come back in the input dtype, accumulated in float32 (float64).
    """
    B, T, d, p = _validate.linear_problem(x, grad_out, method)
    acc = _validate.accumulation_dtype(x.dtype)
    if method == "auto":
        method = choose_linear_norm_method(B, T, d, p, with_weight_grad=True)
    norms = linear_sq_norms_ref(x, grad_out, with_bias, method)
    x2 = x.reshape(B * T, d).to(acc)
    g2 = grad_out.reshape(B * T, p).to(acc)
    grad_weight = (g2.T @ x2).to(x.dtype)
    grad_bias = g2.sum(0).to(x.dtype) if with_bias else None
    return grad_weight, grad_bias, norms


def register_fakes() -> None:
    """Shapes of the compiled Linear ops for fake tensors."""
    @torch.library.register_fake("gradnoise::linear_sq_norms")
    def _linear_sq_norms_fake(x, grad_out, with_bias=False, method="auto"):
        B, _, _, _ = _validate.linear_problem(x, grad_out, method)
        return x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))

    @torch.library.register_fake("gradnoise::linear_weight_grad_and_sq_norms")
    def _linear_weight_grad_and_sq_norms_fake(x, grad_out, with_bias=False, method="auto"):
        B, _, d, p = _validate.linear_problem(x, grad_out, method)
        grad_weight = x.new_empty((p, d))
        grad_bias = x.new_empty((p,) if with_bias else (0,))
        norms = x.new_empty((B,), dtype=_validate.accumulation_dtype(x.dtype))
        return grad_weight, grad_bias, norms
