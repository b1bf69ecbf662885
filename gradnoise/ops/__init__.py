"""Per-sample gradient-norm kernels as functions on tensors.

Backends: "cpu" and "cuda" (compiled ops ``torch.ops.gradnoise.*``, chosen by
the dispatcher from the inputs' device), "triton" (its own ops, for GPUs; runs
on CPU tensors under TRITON_INTERPRET=1) and "reference" (pure PyTorch). The
default is the compiled op of the inputs' device; set GRADNOISE_BACKEND or pass
``backend=`` to choose. See ``python -m gradnoise info``.
"""
from __future__ import annotations

import torch

from . import _validate
from .backends import resolve_backend
from .conv import (conv_sq_norms, conv_sq_norms_ref, conv_weight_grad_and_sq_norms,
                   conv_weight_grad_and_sq_norms_ref)
from .embedding import embedding_sq_norms, embedding_sq_norms_ref
from .norm_layers import (group_norm_backward_and_sq_norms, group_norm_backward_and_sq_norms_ref,
                          group_norm_sq_norms, group_norm_sq_norms_ref,
                          layer_norm_backward_and_sq_norms, layer_norm_backward_and_sq_norms_ref,
                          layer_norm_sq_norms,
                          layer_norm_sq_norms_ref)
from .reductions import sq_norms, sq_norms_ref
from .reference import linear_sq_norms_ref, linear_weight_grad_and_sq_norms_ref

__all__ = [
    "linear_sq_norms",
    "linear_weight_grad_and_sq_norms",
    "linear_sq_norms_ref",
    "linear_weight_grad_and_sq_norms_ref",
    "conv_sq_norms",
    "conv_weight_grad_and_sq_norms",
    "conv_sq_norms_ref",
    "conv_weight_grad_and_sq_norms_ref",
    "layer_norm_sq_norms",
    "layer_norm_sq_norms_ref",
    "group_norm_sq_norms",
    "group_norm_sq_norms_ref",
    "group_norm_backward_and_sq_norms",
    "group_norm_backward_and_sq_norms_ref",
    "layer_norm_backward_and_sq_norms",
    "layer_norm_backward_and_sq_norms_ref",
    "sq_norms",
    "sq_norms_ref",
    "embedding_sq_norms",
    "embedding_sq_norms_ref",
]


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
    be = resolve_backend(x.device, backend)
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
    it can stand in for the weight-gradient GEMM of backward.
    Gradients have the input dtype; norms are float32 (float64 for float64).
    """
    _validate.linear_problem(x, grad_out, method)
    be = resolve_backend(x.device, backend)
    if be == "reference":
        return linear_weight_grad_and_sq_norms_ref(x, grad_out, with_bias, method)
    if be == "triton":
        from .triton import linear as triton_linear
        gw, gb, n = triton_linear.linear_weight_grad_and_sq_norms(x, grad_out, with_bias, method)
    else:
        gw, gb, n = torch.ops.gradnoise.linear_weight_grad_and_sq_norms(
            x, grad_out, with_bias, method)
    return gw, (gb if with_bias else None), n
