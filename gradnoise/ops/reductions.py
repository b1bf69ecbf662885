"""Squared norms: of each tensor of a list, in one pass (the gradient norms the
noise-scale estimator reads every step, gradnoise.noise_scale); and of each
row of a tensor (the per-sample norms of a Linear layer with one position
per sample, gradnoise.layers.linear)."""
from __future__ import annotations

import torch

from . import _validate
from .backends import resolve_backend


def _check(tensors) -> list[torch.Tensor]:
    tensors = list(tensors)
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradnoise.ops.sq_norms: item {k} is a {type(t).__name__}, "
                            "not a torch.Tensor")
        if t.dtype not in _validate.SUPPORTED_DTYPES:
            raise TypeError(f"gradnoise.ops.sq_norms: tensor {k} has dtype {t.dtype}; supported "
                            "dtypes are float32, float64, bfloat16 and float16")
        if t.layout != torch.strided:
            raise ValueError(f"gradnoise.ops.sq_norms: tensor {k} is sparse; pass its values "
                             "(t.coalesce().values())")
    return tensors


def sq_norms_ref(tensors) -> torch.Tensor:
    """Reference twin: float64 [n], ‖t_k‖² = Σ_j t_k[j]² summed in float64."""
    tensors = _check(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([t.detach().double().square().sum().to(tensors[0].device)
                        for t in tensors])


def sq_norms(tensors, backend: str | None = None) -> torch.Tensor:
    """float64 [n]: ‖t_k‖² of each tensor (any shape and strides).

    CPU tensors: one call of the compiled kernel, which streams every tensor
    with every thread and sums in float64 (no overflow, the same result for
    any number of threads). Other devices: torch._foreach_norm (one fused
    launch; accumulates in float32).
    """
    tensors = _check(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("gradnoise.ops.sq_norms: the tensors are on several devices ("
                         + ", ".join(sorted({str(t.device) for t in tensors})) + ")")
    be = resolve_backend(device, backend)
    if be == "reference":
        return sq_norms_ref(tensors)
    if be == "cpu":
        return torch.ops.gradnoise.sq_norms.default(tensors)
    return torch.stack(torch._foreach_norm(tensors)).double().square()


def _check_rows(t, scale) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gradnoise.ops.row_sq_norms: `t` must be a torch.Tensor, got "
                        f"{type(t).__name__}")
    if t.dtype not in _validate.SUPPORTED_DTYPES:
        raise TypeError(f"gradnoise.ops.row_sq_norms: `t` has dtype {t.dtype}; supported dtypes "
                        "are float32, float64, bfloat16 and float16")
    if t.dim() < 1:
        raise ValueError("gradnoise.ops.row_sq_norms: `t` must have a batch dimension, got a "
                         "0-dimensional tensor")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.dim() != 1 or scale.shape[0] != t.shape[0]:
            got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"gradnoise.ops.row_sq_norms: `scale` must have shape "
                             f"[{t.shape[0]}] (one value per row of `t`), got {got}")
        if scale.device != t.device:
            raise ValueError(f"gradnoise.ops.row_sq_norms: `scale` is on {scale.device} but `t` "
                             f"is on {t.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [B, *] as [B, n] (n = 1 for 1-D t)."""
    return t.reshape(t.shape[0], -1) if t.shape[0] > 0 else t.reshape(0, max(1, t[0:1].numel()))


def row_sq_norms_ref(t: torch.Tensor, scale: torch.Tensor | None = None,
                     extra: float = 0.0) -> torch.Tensor:
    """Reference twin of :func:`row_sq_norms`, in float64 then cast."""
    _check_rows(t, scale)
    acc = _validate.accumulation_dtype(t.dtype)
    n = _rows(t.detach()).double().square().sum(1)
    if scale is not None:
        n = n * (scale.double() + extra)
    return n.to(acc)


def row_sq_norms(t: torch.Tensor, scale: torch.Tensor | None = None, extra: float = 0.0,
                 backend: str | None = None) -> torch.Tensor:
    """n_i = ‖t_i‖² over all but dim 0 of t [B, *], times (scale_i + extra)
    when `scale` [B] is given; float32 (float64 for float64 input).

    With t = dY [B, p] of a Linear layer and scale = ‖x_i‖², n_i is the
    per-sample ‖∇W ℓ_i‖² (+ ‖∇b ℓ_i‖² with extra = 1) of Goodfellow (2015),
    ‖dy_i x_iᵀ‖² = ‖x_i‖²‖dy_i‖²: the tracker takes ‖x_i‖² in forward, while x
    is in cache, and ‖dy_i‖² in backward, while dY is.
    CPU tensors: the compiled kernel (rows shared among threads). Other
    devices: torch ops.
    """
    _check_rows(t, scale)
    be = resolve_backend(t.device, backend)
    if be == "cpu":
        return torch.ops.gradnoise.row_sq_norms(t, scale, float(extra))
    if be == "reference":
        return row_sq_norms_ref(t, scale, extra)
    acc = _validate.accumulation_dtype(t.dtype)
    n = torch.linalg.vector_norm(_rows(t), dim=1, dtype=acc).square()
    if scale is not None:
        n = n * (scale.to(acc) + extra)
    return n
