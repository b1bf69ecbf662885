"""Argument checks shared by every backend, so that bad input gets the same
clear error whichever kernel would have run."""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
METHODS = ("auto", "goodfellow", "ghost", "fused")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_pair(x: torch.Tensor, grad_out: torch.Tensor, layout: str) -> None:
    """Both tensors, a supported dtype (the same), at least 2-D, one device."""
    for name, t in (("x", x), ("grad_out", grad_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradnoise: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"gradnoise: `{name}` has dtype {t.dtype}; supported dtypes are "
                "float32, float64, bfloat16 and float16")
        if t.dim() < 2:
            raise ValueError(
                f"gradnoise: `{name}` must have at least 2 dimensions {layout}, "
                f"got shape {tuple(t.shape)}")
    if x.dtype != grad_out.dtype:
        raise TypeError(
            f"gradnoise: `x` is {x.dtype} but `grad_out` is {grad_out.dtype}; "
            "pass both in the layer's compute dtype")
    if x.device != grad_out.device:
        raise ValueError(
            f"gradnoise: `x` is on {x.device} but `grad_out` is on {grad_out.device}")


def linear_problem(x: torch.Tensor, grad_out: torch.Tensor, method: str = "auto"):
    """Check a Linear layer's (input, output gradient) pair.

    Returns (B, T, d, p) with T the product of the middle dimensions
    (T = 1 for 2-D input).
    """
    tensor_pair(x, grad_out, "[B, ..., features]")
    if x.dim() != grad_out.dim() or x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(
            f"gradnoise: `x` of shape {tuple(x.shape)} and `grad_out` of shape "
            f"{tuple(grad_out.shape)} must agree on every dimension but the last "
            "([B, ..., d] and [B, ..., p])")
    if method not in METHODS:
        raise ValueError(f"gradnoise: unknown `method` {method!r}; choose one of {METHODS}")
    B = x.shape[0]
    T = 1
    for s in x.shape[1:-1]:
        T *= s
    d, p = x.shape[-1], grad_out.shape[-1]
    if method == "goodfellow" and T != 1:
        raise ValueError(
            f"gradnoise: method 'goodfellow' needs one position per sample (T = 1), but "
            f"`x` of shape {tuple(x.shape)} has T = {T}; use 'ghost', 'fused' or 'auto'")
    return B, T, d, p
