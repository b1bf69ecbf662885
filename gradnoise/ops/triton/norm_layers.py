"""Triton kernels for the per-sample gradient norms of normalisation layers.

For a LayerNorm / RMSNorm with input x and output gradient dY viewed as
[B, T, C], and a GroupNorm with x, dY [B, C, S] and G groups, the per-sample
gradients of the affine parameters are (Gray et al. 2024, "Normalization
Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in
Transformers")

    LayerNorm:  gγ_i = Σ_t dY_i,t ⊙ x̂_i,t         gβ_i = Σ_t dY_i,t
    GroupNorm:  gγ_i[c] = Σ_s dY_i[c,s]·x̂_i[c,s]    gβ_i[c] = Σ_s dY_i[c,s]

with x̂ = (x − mean)·rstd (RMSNorm: x·rstd), rstd = 1/√(σ² + ε), statistics
over a row of C entries (LayerNorm) or a group of (C/G)·S entries (GroupNorm).
The ops return n_i = ‖gγ_i‖² + ‖gβ_i‖² (as the flags say), accumulated in
float32 (float64 for float64 input). Each op is three small launches:

- statistics: mean and rstd per row (group), two passes over it;
- gradients: LayerNorm programs own (sample, chunk of rows, block of
  columns) and sum dY ⊙ x̂ and dY down their rows into a [B, chunks, 2, C]
  buffer; GroupNorm programs own (sample, block of channels) and reduce over
  S, squaring the channels' gradients at once;
- finish: per sample, the LayerNorm chunks are added in order, squared and
  summed (GroupNorm: torch adds the blocks' partial norms).

Every sum runs in a fixed order, so results are reproducible. The ops are
``torch.ops.gradnoise_triton.layer_norm_sq_norms`` and
``torch.ops.gradnoise_triton.group_norm_sq_norms``; on CPU tensors they need
the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is
imported).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _validate
from .common import INTERPRETED, cdiv, check_device, on_device, sm_count, tl_dtype
from ..norm_layers import check_group_norm_args, check_layer_norm_args

__all__ = ["layer_norm_sq_norms", "group_norm_sq_norms"]


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _row_stats_kernel(x_ptr, eps_ptr, mean_ptr, rstd_ptr, R, C,
                      RMS: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean and rstd = 1/√(σ² + ε) of BLOCK_R rows of the contiguous [R, C] x.

    Two passes over each row: the mean, then Σ(x − mean)² (RMSNorm: mean 0
    and Σx², whose 1/C is the mean square).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    base = x_ptr + rows.to(tl.int64)[:, None] * C
    offs = tl.arange(0, BLOCK_C)
    mean = tl.zeros((BLOCK_R,), ACC)
    if not RMS:
        acc = tl.zeros((BLOCK_R, BLOCK_C), ACC)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            mask = mask_r[:, None] & (cols < C)[None, :]
            acc += tl.load(base + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.sum(acc, axis=1) / C
    acc = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = mask_r[:, None] & (cols < C)[None, :]
        v = tl.load(base + cols[None, :], mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - mean[:, None], 0.0)
        acc += d * d
    eps = tl.load(eps_ptr)
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / C + eps)
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _layer_norm_grads_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, part_ptr,
                             T, C, n_chunks, rows_per_chunk,
                             WITH_WEIGHT: tl.constexpr, WITH_BIAS: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (b·n_chunks + k, column block): Σ over rows t of chunk k of
    sample b of dY_b,t ⊙ x̂_b,t (γ) and dY_b,t (β), into part[b, k, 0 / 1, cols]."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    k = pid % n_chunks
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    t_begin = k * rows_per_chunk
    t_end = tl.minimum(T, t_begin + rows_per_chunk)
    offs_t = tl.arange(0, BLOCK_T)
    acc_g = tl.zeros((BLOCK_T, BLOCK_C), ACC)
    acc_b = tl.zeros((BLOCK_T, BLOCK_C), ACC)
    for t0 in range(t_begin, t_end, BLOCK_T):
        ts = t0 + offs_t
        mask_t = ts < t_end
        rows = (b * T + ts).to(tl.int64)
        mask = mask_t[:, None] & mask_c[None, :]
        offs = rows[:, None] * C + cols[None, :]
        dy = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        if WITH_BIAS:
            acc_b += dy
        if WITH_WEIGHT:
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            mean = tl.load(mean_ptr + rows, mask=mask_t, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=mask_t, other=0.0)
            acc_g += dy * ((xv - mean[:, None]) * rstd[:, None])
    out = part_ptr + pid.to(tl.int64) * 2 * C + cols
    if WITH_WEIGHT:
        tl.store(out, tl.sum(acc_g, axis=0), mask=mask_c)
    if WITH_BIAS:
        tl.store(out + C, tl.sum(acc_b, axis=0), mask=mask_c)


@triton.jit
def _layer_norm_finish_kernel(part_ptr, out_ptr, C, n_chunks,
                              WITH_WEIGHT: tl.constexpr, WITH_BIAS: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """n_b = ‖Σ_k part[b, k, 0]‖² + ‖Σ_k part[b, k, 1]‖², chunks added in order."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        sg = tl.zeros((BLOCK_C,), ACC)
        sb = tl.zeros((BLOCK_C,), ACC)
        for k in range(0, n_chunks):
            base = part_ptr + (b * n_chunks + k).to(tl.int64) * 2 * C + cols
            if WITH_WEIGHT:
                sg += tl.load(base, mask=mask, other=0.0)
            if WITH_BIAS:
                sb += tl.load(base + C, mask=mask, other=0.0)
        acc += sg * sg + sb * sb
    tl.store(out_ptr + b, tl.sum(acc, axis=0))


@triton.jit
def _group_stats_kernel(x_ptr, eps_ptr, mean_ptr, rstd_ptr, n,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    """mean and rstd of group bg = program_id, the n = (C/G)·S consecutive
    values of the contiguous [B, C, S] x starting at bg·n; two passes."""
    bg = tl.program_id(0)
    base = x_ptr + bg.to(tl.int64) * n
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), ACC)
    for j0 in range(0, n, BLOCK):
        j = j0 + offs
        acc += tl.load(base + j, mask=j < n, other=0.0).to(ACC)
    mean = tl.sum(acc, axis=0) / n
    acc = tl.zeros((BLOCK,), ACC)
    for j0 in range(0, n, BLOCK):
        j = j0 + offs
        mask = j < n
        v = tl.load(base + j, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - mean, 0.0)
        acc += d * d
    eps = tl.load(eps_ptr)
    tl.store(mean_ptr + bg, mean)
    tl.store(rstd_ptr + bg, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps))


@triton.jit
def _group_norm_grads_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, part_ptr,
                             C, S, G, cpg, n_cblocks,
                             WITH_WEIGHT: tl.constexpr, WITH_BIAS: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_CH: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (b·n_cblocks + channel block): per channel c, gγ = rstd·Σ_s dY·(x − mean)
    and gβ = Σ_s dY; part[program] = Σ_c gγ² + gβ² over the block's channels."""
    pid = tl.program_id(0)
    b = pid // n_cblocks
    ch = (pid % n_cblocks) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    mask_ch = ch < C
    bg = b * G + ch // cpg
    rows = (b * C + ch).to(tl.int64) * S
    offs_s = tl.arange(0, BLOCK_S)
    mean = tl.zeros((BLOCK_CH,), ACC)
    if WITH_WEIGHT:
        mean = tl.load(mean_ptr + bg, mask=mask_ch, other=0.0)
    acc_g = tl.zeros((BLOCK_CH, BLOCK_S), ACC)
    acc_b = tl.zeros((BLOCK_CH, BLOCK_S), ACC)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + offs_s
        mask = mask_ch[:, None] & (ss < S)[None, :]
        offs = rows[:, None] + ss[None, :]
        dy = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc_b += dy
        if WITH_WEIGHT:
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            acc_g += dy * (xv - mean[:, None])
    val = tl.zeros((BLOCK_CH,), ACC)
    if WITH_WEIGHT:
        rstd = tl.load(rstd_ptr + bg, mask=mask_ch, other=0.0)
        gg = tl.sum(acc_g, axis=1) * rstd
        val += gg * gg
    if WITH_BIAS:
        gb = tl.sum(acc_b, axis=1)
        val += gb * gb
    tl.store(part_ptr + pid, tl.sum(tl.where(mask_ch, val, 0.0), axis=0))


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _blocks(dtype: torch.dtype, interpreted: bool) -> dict:
    if interpreted:
        # Small tiles: the interpreter's cost is per operation, and the tests'
        # odd shapes still span several of them.
        return dict(stats=(4, 16), grads=(8, 16), finish=16, group=64, gn=(4, 16),
                    num_warps=1)
    if dtype == torch.float64:
        return dict(stats=(4, 128), grads=(16, 64), finish=256, group=512, gn=(8, 64),
                    num_warps=4)
    return dict(stats=(4, 256), grads=(16, 128), finish=512, group=1024, gn=(8, 128),
                num_warps=4)


def _rows_per_chunk(B: int, T: int, column_blocks: int, block_t: int,
                    device: torch.device) -> int:
    """Rows per program: enough programs for about two waves, whole BLOCK_T tiles."""
    want_chunks = cdiv(2 * sm_count(device), max(1, B * column_blocks))
    rows = cdiv(T, max(1, want_chunks))
    return max(block_t, cdiv(rows, block_t) * block_t)


def _layer_norm(x, grad_out, normalized_numel, eps, rms, with_weight, with_bias):
    B, T, C = check_layer_norm_args(x, grad_out, normalized_numel, eps)
    check_device(x, "gradnoise.ops.triton.norm_layers")
    acc = _validate.accumulation_dtype(x.dtype)
    out = torch.zeros(B, dtype=acc, device=x.device)
    if B * T == 0 or not (with_weight or with_bias):
        return out
    cfg = _blocks(x.dtype, INTERPRETED)
    xc = x.contiguous()
    gc = grad_out.contiguous()
    R = B * T
    ACC = tl_dtype(acc)
    with on_device(x.device):
        mean = rstd = xc  # unused unless with_weight
        if with_weight:
            mean = torch.empty(R, dtype=acc, device=x.device)
            rstd = torch.empty(R, dtype=acc, device=x.device)
            eps_t = torch.full((1,), eps, dtype=acc, device=x.device)
            block_r, block_c = cfg["stats"]
            _row_stats_kernel[(cdiv(R, block_r),)](
                xc, eps_t, mean, rstd, R, C, RMS=rms, ACC=ACC,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=cfg["num_warps"])
        block_t, block_c = cfg["grads"]
        column_blocks = cdiv(C, block_c)
        rows_per_chunk = _rows_per_chunk(B, T, column_blocks, block_t, x.device)
        n_chunks = cdiv(T, rows_per_chunk)
        part = torch.empty((B * n_chunks, 2, C), dtype=acc, device=x.device)
        _layer_norm_grads_kernel[(B * n_chunks, column_blocks)](
            xc, gc, mean, rstd, part, T, C, n_chunks, rows_per_chunk,
            WITH_WEIGHT=with_weight, WITH_BIAS=with_bias, ACC=ACC,
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=cfg["num_warps"])
        _layer_norm_finish_kernel[(B,)](
            part, out, C, n_chunks, WITH_WEIGHT=with_weight, WITH_BIAS=with_bias, ACC=ACC,
            BLOCK_C=cfg["finish"], num_warps=cfg["num_warps"])
    return out


def _group_norm(x, grad_out, groups, eps, with_weight, with_bias):
    B, C, S = check_group_norm_args(x, grad_out, groups, eps)
    check_device(x, "gradnoise.ops.triton.norm_layers")
    acc = _validate.accumulation_dtype(x.dtype)
    if B * C * S == 0 or not (with_weight or with_bias):
        return torch.zeros(B, dtype=acc, device=x.device)
    cfg = _blocks(x.dtype, INTERPRETED)
    xc = x.contiguous()
    gc = grad_out.contiguous()
    cpg = C // groups
    ACC = tl_dtype(acc)
    with on_device(x.device):
        mean = rstd = xc  # unused unless with_weight
        if with_weight:
            mean = torch.empty(B * groups, dtype=acc, device=x.device)
            rstd = torch.empty(B * groups, dtype=acc, device=x.device)
            eps_t = torch.full((1,), eps, dtype=acc, device=x.device)
            _group_stats_kernel[(B * groups,)](
                xc, eps_t, mean, rstd, cpg * S, ACC=ACC, BLOCK=cfg["group"],
                num_warps=cfg["num_warps"])
        block_ch, block_s = cfg["gn"]
        block_s = min(block_s, max(16, triton.next_power_of_2(S)))
        n_cblocks = cdiv(C, block_ch)
        part = torch.empty(B * n_cblocks, dtype=acc, device=x.device)
        _group_norm_grads_kernel[(B * n_cblocks,)](
            xc, gc, mean, rstd, part, C, S, groups, cpg, n_cblocks,
            WITH_WEIGHT=with_weight, WITH_BIAS=with_bias, ACC=ACC,
            BLOCK_CH=block_ch, BLOCK_S=block_s, num_warps=cfg["num_warps"])
    return part.view(B, n_cblocks).sum(1)


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------

@torch.library.custom_op("gradnoise_triton::layer_norm_sq_norms", mutates_args=())
def _layer_norm_sq_norms_op(x: torch.Tensor, grad_out: torch.Tensor, normalized_numel: int,
                            eps: float, rms: bool, with_weight: bool,
                            with_bias: bool) -> torch.Tensor:
    return _layer_norm(x, grad_out, normalized_numel, eps, rms, with_weight, with_bias)


@_layer_norm_sq_norms_op.register_fake
def _(x, grad_out, normalized_numel, eps, rms, with_weight, with_bias):
    B, _, _ = check_layer_norm_args(x, grad_out, normalized_numel, eps)
    return x.new_empty(B, dtype=_validate.accumulation_dtype(x.dtype))


@torch.library.custom_op("gradnoise_triton::group_norm_sq_norms", mutates_args=())
def _group_norm_sq_norms_op(x: torch.Tensor, grad_out: torch.Tensor, groups: int, eps: float,
                            with_weight: bool, with_bias: bool) -> torch.Tensor:
    return _group_norm(x, grad_out, groups, eps, with_weight, with_bias)


@_group_norm_sq_norms_op.register_fake
def _(x, grad_out, groups, eps, with_weight, with_bias):
    B, _, _ = check_group_norm_args(x, grad_out, groups, eps)
    return x.new_empty(B, dtype=_validate.accumulation_dtype(x.dtype))


def layer_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, normalized_numel: int,
                        eps: float, rms: bool = False, with_weight: bool = True,
                        with_bias: bool = True) -> torch.Tensor:
    """Per-sample ‖Σ_t dY ⊙ x̂‖² + ‖Σ_t dY‖², shape [B]; see the module docstring."""
    return torch.ops.gradnoise_triton.layer_norm_sq_norms(
        x, grad_out, normalized_numel, eps, rms, with_weight, with_bias)


def group_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, groups: int, eps: float,
                        with_weight: bool = True, with_bias: bool = True) -> torch.Tensor:
    """Per-sample Σ_c (Σ_s dY·x̂)² + (Σ_s dY)², shape [B]; see the module docstring."""
    return torch.ops.gradnoise_triton.group_norm_sq_norms(
        x, grad_out, groups, eps, with_weight, with_bias)
