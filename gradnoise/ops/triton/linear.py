"""Triton kernels for the per-sample gradient norms of a Linear layer.

For a Linear layer y = x Wᵀ + b with input X_i [T, d] and output gradient
dY_i [T, p] of sample i (T = 1 for 2-D input), the per-sample gradients are
G_i = dY_iᵀ X_i (p × d) and Σ_t dY_i,t (p). The ops return, per sample,

    n_i = ‖G_i‖²_F (+ ‖Σ_t dY_i,t‖² with the bias),

accumulated in float32 (float64 for float64 input), and optionally the batch
gradients Σ_i G_i and Σ_i,t dY_i,t in the input dtype. The methods:

- "goodfellow" (T = 1): ‖G_i‖² = ‖x_i‖²·‖dy_i‖² (Goodfellow 2015, "Efficient
  per-example gradient computations");
- "ghost": ‖G_i‖² = ⟨X_i X_iᵀ, dY_i dY_iᵀ⟩_F (the ghost norm of Li et al. 2021,
  "Large language models can be strong differentially private learners"), in
  tiles of the Gram matrices, never holding a B × T × T buffer;
- "fused": the weight-gradient GEMM Σ_i dY_iᵀ X_i with its reduction ordered by
  sample; each program squares its tile of G_i at the sample boundary, so the
  norms cost 2Bdp on top of the GEMM and no per-sample gradient is stored;
- "auto": the cheapest by :mod:`gradnoise.ops.cost_model`, on every call.

The ops are ``torch.ops.gradnoise_triton.linear_sq_norms`` and
``torch.ops.gradnoise_triton.linear_weight_grad_and_sq_norms`` (the latter
returns an empty bias gradient when ``with_bias`` is False, because custom ops
cannot return None). On CPU tensors they need the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported). The kernels
themselves are in linear_kernels.py.
"""
from __future__ import annotations

import functools

import torch
import triton

from .. import _validate
from .common import INTERPRETED, cdiv, check_device, on_device, sm_count, tl_dtype
from .tuning import min_tile
from .linear_kernels import (_linear_bias_kernel, _linear_fused_kernel, _linear_ghost_kernel,
                             _linear_goodfellow_kernel)
from ..cost_model import choose_linear_norm_method, tensor_core_weight

__all__ = ["linear_sq_norms", "linear_weight_grad_and_sq_norms"]


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

# Splitting the samples over programs needs a float [splits, p, d] workspace
# for the weight gradient; splits are only wanted when the p × d tiles alone
# cannot fill the GPU, so this bound keeps the workspace small.
_MAX_GRAD_SPLITS = 16


@functools.lru_cache(maxsize=None)
def _blocks(dtype: torch.dtype, interpreted: bool) -> dict:
    if interpreted:
        # The smallest tiles tl.dot takes: the interpreter's cost is per
        # operation, and the tests' odd shapes still span several tiles.
        return dict(ghost=(16, 16), goodfellow=(16, 16), bias=(16, 16), num_warps=1)
    if dtype == torch.float64:
        return dict(ghost=(32, 16), goodfellow=(16, 128), bias=(64, 32), num_warps=4)
    return dict(ghost=(64, 32), goodfellow=(16, 128), bias=(128, 32), num_warps=4)


def _rows_block(T: int, cap: int) -> int:
    """A power of two ≥ 16 (tl.dot's minimum) for a sample's T rows, at most cap."""
    return max(16, min(cap, triton.next_power_of_2(max(T, 1))))


def _sample_splits(B: int, programs_per_split: int, device: torch.device,
                   max_splits: int) -> tuple[int, int]:
    """(splits, samples per split): enough programs for about two waves on the device."""
    want = cdiv(2 * sm_count(device), max(1, programs_per_split))
    per = cdiv(B, max(1, min(B, want, max_splits)))
    return cdiv(B, per), per


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """IEEE products unless the user allowed TF32 for float32 matmuls, as torch does."""
    if (dtype == torch.float32 and device.type == "cuda" and torch.version.hip is None
            and torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "ieee"


def _store_direct(splits: int, dtype: torch.dtype) -> bool:
    """Whether a kernel stores the gradient in its final dtype, not a float workspace.

    One split can; the interpreter's float32 -> bfloat16 cast truncates where
    GPUs round to nearest, so there torch does the cast.
    """
    return splits == 1 and not (INTERPRETED and dtype == torch.bfloat16)


def _fused(x2, g2, B, T, d, p, compute_norms: bool, compute_grad: bool):
    """(grad_weight or None, weight norms [B] or None) from the fused kernel,
    its tiles chosen by the autotuner (tuning.py)."""
    acc = _validate.accumulation_dtype(x2.dtype)
    min_p, min_d = min_tile(x2.dtype)
    tiles = cdiv(p, min_p) * cdiv(d, min_d)
    chunks = (_chunks_per_sample(B, T, d, p, tiles, x2.device, acc.itemsize) if compute_norms
              else 0)
    if chunks:
        return _fused_split_k(x2, g2, B, T, d, p, chunks, compute_grad)
    splits, per = _sample_splits(B, tiles, x2.device,
                                 _MAX_GRAD_SPLITS if compute_grad else B)
    # Zeroed: a configuration with larger tiles fills only part of it.
    part = (torch.zeros((tiles, B), dtype=acc, device=x2.device) if compute_norms
            else x2.new_empty(0))
    direct = _store_direct(splits, x2.dtype)
    grad = out = None
    if compute_grad:
        out = torch.empty((p, d), dtype=x2.dtype, device=x2.device)
        grad = out.unsqueeze(0) if direct else torch.empty(
            (splits, p, d), dtype=acc, device=x2.device)
    w = grad if grad is not None else x2.unsqueeze(0)
    _launch_fused(x2, g2, w, part, B, T, d, p, per, 0, 0, splits,
                  compute_norms, compute_grad)
    if compute_grad and not direct:
        out = grad.sum(0).to(x2.dtype)
    return out, (part.sum(0) if compute_norms else None)


def _launch_fused(x2, g2, w, part, B, T, d, p, per, chunks, rows_per_chunk, splits,
                  compute_norms, compute_grad):
    _linear_fused_kernel[lambda meta: (cdiv(p, meta["BLOCK_P"]) * cdiv(d, meta["BLOCK_D"]),
                                       splits)](
        x2, g2, w, part, B, T, d, p, per, chunks, rows_per_chunk,
        triton.next_power_of_2(max(T, 1)), triton.next_power_of_2(max(per, 1)),
        x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        COMPUTE_NORMS=compute_norms, COMPUTE_GRAD=compute_grad,
        ACC=tl_dtype(_validate.accumulation_dtype(x2.dtype)),
        UPCAST=INTERPRETED and x2.dtype in (torch.float16, torch.bfloat16),
        PRECISION=_dot_precision(x2.dtype, x2.device), GROUP_P=_GROUP_P)


# p-tiles per group of the fused kernel's program order (L2 reuse of X's strips)
_GROUP_P = 8

# Split-K inside samples holds per-sample gradients [B, chunks, p, d] and
# their sums [B, p, d] in the accumulation dtype: only when that stays small.
_SPLIT_K_BYTES = 256 * 2**20


def _chunks_per_sample(B: int, T: int, d: int, p: int, tiles: int,
                       device: torch.device, itemsize: int) -> int:
    """Chunks to split each sample's rows into (0: none) where the samples
    and tiles alone leave the GPU's multiprocessors idle: few samples of
    long rows on a narrow layer."""
    sms = sm_count(device)
    if B * tiles >= sms or T < 64:
        return 0
    chunks = min(cdiv(2 * sms, B * tiles), T // 32)
    # the chunks' partial gradients, and their sums per sample
    if chunks < 2 or B * (chunks + 1) * p * d * itemsize > _SPLIT_K_BYTES:
        return 0
    return chunks


def _fused_split_k(x2, g2, B, T, d, p, chunks, compute_grad):
    """Each sample's rows in `chunks` pieces, one program per (tile, piece):
    the pieces' partial gradients G_i,c land in a workspace of the
    accumulation dtype, their sum over c is G_i, squared for the norm and
    summed over i for the gradient (memory B·(chunks + 1)·p·d elements,
    bounded by _SPLIT_K_BYTES)."""
    rows_per_chunk = cdiv(T, chunks)
    chunks = cdiv(T, rows_per_chunk)
    acc = _validate.accumulation_dtype(x2.dtype)
    partial = torch.empty((B * chunks, p, d), dtype=acc, device=x2.device)
    _launch_fused(x2, g2, partial, x2.new_empty(0), B, T, d, p, 1, chunks, rows_per_chunk,
                  B * chunks, False, True)
    per_sample = partial.view(B, chunks, p, d).sum(1)
    norms = per_sample.square().sum((1, 2))
    return (per_sample.sum(0).to(x2.dtype) if compute_grad else None), norms


def _ghost(x2, g2, B, T, d, p):
    cfg = _blocks(x2.dtype, INTERPRETED)
    block_t, block_k = cfg["ghost"]
    block_t = _rows_block(T, block_t)
    acc = _validate.accumulation_dtype(x2.dtype)
    n_blocks = cdiv(T, block_t)
    n_pairs = n_blocks * (n_blocks + 1) // 2
    part = torch.empty((B, n_pairs), dtype=acc, device=x2.device)
    _linear_ghost_kernel[(B * n_pairs,)](
        x2, g2, part, T, d, p, n_pairs,
        x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1),
        ACC=tl_dtype(acc), UPCAST=INTERPRETED and x2.dtype in (torch.float16, torch.bfloat16),
        PRECISION=_dot_precision(x2.dtype, x2.device),
        BLOCK_T=block_t, BLOCK_K=block_k, num_warps=cfg["num_warps"])
    return part.sum(1)


def _goodfellow(x2, g2, B, d, p):
    cfg = _blocks(x2.dtype, INTERPRETED)
    block_b, block_k = cfg["goodfellow"]
    acc = _validate.accumulation_dtype(x2.dtype)
    out = torch.empty(B, dtype=acc, device=x2.device)
    _linear_goodfellow_kernel[(cdiv(B, block_b),)](
        x2, g2, out, B, d, p, x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1),
        ACC=tl_dtype(acc), BLOCK_B=block_b, BLOCK_K=block_k, num_warps=cfg["num_warps"])
    return out


def _bias(g2, B, T, p, compute_grad: bool):
    """(grad_bias or None, bias norms [B])."""
    cfg = _blocks(g2.dtype, INTERPRETED)
    block_p, block_t = cfg["bias"]
    block_t = min(block_t, triton.next_power_of_2(T))
    acc = _validate.accumulation_dtype(g2.dtype)
    grid_p = cdiv(p, block_p)
    splits, per = _sample_splits(B, grid_p, g2.device, _MAX_GRAD_SPLITS if compute_grad else B)
    part = torch.empty((grid_p, B), dtype=acc, device=g2.device)
    direct = _store_direct(splits, g2.dtype)
    out = None
    b = g2
    if compute_grad:
        out = torch.empty(p, dtype=g2.dtype, device=g2.device)
        b = out.unsqueeze(0) if direct else torch.empty((splits, p), dtype=acc, device=g2.device)
    _linear_bias_kernel[(grid_p, splits)](
        g2, b, part, B, T, p, per, g2.stride(0), g2.stride(1), b.stride(0),
        COMPUTE_GRAD=compute_grad, ACC=tl_dtype(acc),
        BLOCK_P=block_p, BLOCK_T=block_t, num_warps=cfg["num_warps"])
    if compute_grad and not direct:
        out = b.sum(0).to(g2.dtype)
    return out, part.sum(0)


def _linear(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool, method: str,
            with_weight_grad: bool):
    """(grad_weight or None, grad_bias or None, sq_norms [B])."""
    B, T, d, p = _validate.linear_problem(x, grad_out, method)
    check_device(x, "gradnoise.ops.triton.linear")
    if method == "auto":
        weight = tensor_core_weight(x.dtype, _dot_precision(x.dtype, x.device),
                                    on_gpu=x.device.type == "cuda" and not INTERPRETED)
        method = choose_linear_norm_method(B, T, d, p, with_weight_grad, weight)
    acc = _validate.accumulation_dtype(x.dtype)
    x2 = x.reshape(B * T, d)
    g2 = grad_out.reshape(B * T, p)
    norms = grad_weight = grad_bias = None
    with on_device(x.device):
        if B * T > 0 and d > 0 and p > 0:
            if method == "fused":
                grad_weight, norms = _fused(x2, g2, B, T, d, p, compute_norms=True,
                                            compute_grad=with_weight_grad)
            else:
                norms = (_goodfellow(x2, g2, B, d, p) if method == "goodfellow"
                         else _ghost(x2, g2, B, T, d, p))
                if with_weight_grad:
                    grad_weight, _ = _fused(x2, g2, B, T, d, p, compute_norms=False,
                                            compute_grad=True)
        if with_bias and B * T > 0 and p > 0:
            grad_bias, bias_norms = _bias(g2, B, T, p, compute_grad=with_weight_grad)
            norms = bias_norms if norms is None else norms + bias_norms
    if norms is None:
        norms = torch.zeros(B, dtype=acc, device=x.device)
    if with_weight_grad:
        if grad_weight is None:
            grad_weight = x.new_zeros((p, d))
        if with_bias and grad_bias is None:
            grad_bias = x.new_zeros(p)
    return grad_weight, grad_bias, norms


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------

@torch.library.custom_op("gradnoise_triton::linear_sq_norms", mutates_args=())
def _linear_sq_norms_op(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool,
                        method: str) -> torch.Tensor:
    return _linear(x, grad_out, with_bias, method, with_weight_grad=False)[2]


@_linear_sq_norms_op.register_fake
def _(x, grad_out, with_bias, method):
    _validate.linear_problem(x, grad_out, method)
    return x.new_empty(x.shape[0], dtype=_validate.accumulation_dtype(x.dtype))


@torch.library.custom_op("gradnoise_triton::linear_weight_grad_and_sq_norms", mutates_args=())
def _linear_weight_grad_and_sq_norms_op(
        x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool,
        method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_weight, grad_bias, norms = _linear(x, grad_out, with_bias, method,
                                            with_weight_grad=True)
    if grad_bias is None:
        grad_bias = x.new_empty(0)
    return grad_weight, grad_bias, norms


@_linear_weight_grad_and_sq_norms_op.register_fake
def _(x, grad_out, with_bias, method):
    _validate.linear_problem(x, grad_out, method)
    d, p = x.shape[-1], grad_out.shape[-1]
    return (x.new_empty((p, d)), x.new_empty(p if with_bias else 0),
            x.new_empty(x.shape[0], dtype=_validate.accumulation_dtype(x.dtype)))


def linear_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, with_bias: bool = False,
                    method: str = "auto") -> torch.Tensor:
    """Per-sample ‖dY_iᵀ X_i‖²_F (+ ‖Σ_t dY_i,t‖²), shape [B]; see the module docstring."""
    return torch.ops.gradnoise_triton.linear_sq_norms(x, grad_out, with_bias, method)


def linear_weight_grad_and_sq_norms(x: torch.Tensor, grad_out: torch.Tensor,
                                    with_bias: bool = False, method: str = "auto"):
    """(grad_weight [p, d], grad_bias [p] or an empty [0] tensor, sq_norms [B])."""
    return torch.ops.gradnoise_triton.linear_weight_grad_and_sq_norms(
        x, grad_out, with_bias, method)
