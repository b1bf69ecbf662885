"""The Triton programs of the Linear ops (gradnoise/ops/triton/linear.py has
the methods, the launchers and the ops): the fused weight-gradient GEMM whose
reduction is ordered by sample, the ghost norm's Gram-matrix tiles, the
T = 1 norms and the bias sums."""
import triton
import triton.language as tl

from .tuning import benchmarker, fused_configs, prune_fused_configs


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

@triton.jit
def _accumulate_gt_x(acc, g_cols, x_cols, row0, n_rows, mask_p, mask_d, stride_gr, stride_xr,
                     ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """acc += dY[rows, p-tile]ᵀ · X[rows, d-tile] for rows row0 .. row0 + min(n_rows, BLOCK_T)."""
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < n_rows
    rows = (row0 + offs_t).to(tl.int64)
    # dY is read transposed, [BLOCK_P, BLOCK_T], so that the tile product is a plain dot.
    g = tl.load(g_cols + rows[None, :] * stride_gr, mask=mask_p[:, None] & mask_t[None, :],
                other=0.0)
    x = tl.load(x_cols + rows[:, None] * stride_xr, mask=mask_t[:, None] & mask_d[None, :],
                other=0.0)
    if UPCAST:
        g = g.to(tl.float32)
        x = x.to(tl.float32)
    return tl.dot(g, x, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.autotune(configs=fused_configs(), key=["d", "p", "T_KEY", "SPLIT_KEY", "COMPUTE_NORMS",
                                             "COMPUTE_GRAD", "PRECISION"],
                 prune_configs_by={"early_config_prune": prune_fused_configs},
                 reset_to_zero=["part_ptr"], do_bench=benchmarker())
@triton.jit
def _linear_fused_kernel(
        x_ptr, g_ptr, w_ptr, part_ptr,
        B, T, d, p, samples_per_split, chunks_per_sample, rows_per_chunk, T_KEY, SPLIT_KEY,
        stride_xr, stride_xd, stride_gr, stride_gp, stride_ws, stride_wp, stride_wd,
        COMPUTE_NORMS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
        ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
        GROUP_P: tl.constexpr):
    """Weight-gradient GEMM with per-sample norms squared at sample boundaries.

    Program (tile, s) owns the tile W[P, D] of grad_weight = Σ_i dY_iᵀ X_i and
    the samples i of split s. It walks them in order, accumulating the tile of
    G_i = dY_iᵀ X_i over the sample's T rows in BLOCK_T chunks, then
      part[tile, i] = ‖G_i[P, D]‖²_F                     (COMPUTE_NORMS)
      W[P, D]      += G_i[P, D]                          (COMPUTE_GRAD)
    so that ‖G_i‖²_F = Σ_tile part[tile, i]. The norms add 2·BLOCK_P·BLOCK_D
    flops per sample to the 2·T·BLOCK_P·BLOCK_D of the GEMM (a 1/T overhead)
    and need B floats per tile, never a per-sample gradient. With
    COMPUTE_NORMS off this is the plain GEMM over the split's rows, without
    sample boundaries; with chunks_per_sample > 0 (split-K inside samples,
    for few samples) split s takes rows_per_chunk rows of sample
    s // chunks_per_sample, its chunk s % chunks_per_sample. W is grad_weight
    itself (one split) or a float workspace [splits, p, d] summed by the
    launcher. T_KEY and SPLIT_KEY only key the autotuner's choice of tiles
    (T and the samples per split, rounded to powers of two).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_p = tl.cdiv(p, BLOCK_P)
    num_d = tl.cdiv(d, BLOCK_D)
    # Grouped order: GROUP_P consecutive p-tiles take each d-tile in turn, so
    # that the programs running at once share their X and dY strips in L2.
    per_group = GROUP_P * num_d
    first_p = (pid // per_group) * GROUP_P
    group_size = tl.minimum(num_p - first_p, GROUP_P)
    pid_p = first_p + (pid % per_group) % group_size
    pid_d = (pid % per_group) // group_size
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < p
    mask_d = offs_d < d
    g_cols = g_ptr + offs_p[:, None].to(tl.int64) * stride_gp
    x_cols = x_ptr + offs_d[None, :].to(tl.int64) * stride_xd
    first = split * samples_per_split
    last = tl.minimum(first + samples_per_split, B)

    grad = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    if COMPUTE_NORMS:
        tile = pid_p * num_d + pid_d
        for i in range(first, last):
            acc = tl.zeros((BLOCK_P, BLOCK_D), ACC)
            for t0 in range(0, T, BLOCK_T):
                acc = _accumulate_gt_x(acc, g_cols, x_cols, i * T + t0, T - t0, mask_p, mask_d,
                                       stride_gr, stride_xr, ACC, UPCAST, PRECISION, BLOCK_T)
            if COMPUTE_GRAD:
                grad += acc
            tl.store(part_ptr + tile * B + i, tl.sum(acc * acc))
    else:
        row_start = first * T
        row_end = last * T
        if chunks_per_sample > 0:
            sample = split // chunks_per_sample
            row_start = sample * T + (split % chunks_per_sample) * rows_per_chunk
            row_end = tl.minimum(row_start + rows_per_chunk, (sample + 1) * T)
        for r0 in range(row_start, row_end, BLOCK_T):
            grad = _accumulate_gt_x(grad, g_cols, x_cols, r0, row_end - r0, mask_p, mask_d,
                                    stride_gr, stride_xr, ACC, UPCAST, PRECISION, BLOCK_T)
    if COMPUTE_GRAD:
        w = (w_ptr + split * stride_ws + offs_p[:, None] * stride_wp
             + offs_d[None, :] * stride_wd)
        tl.store(w, grad.to(w_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])


@triton.jit
def _gram_block(acc, ptr, rows_a, rows_b, mask_a, mask_b, n, stride_r, stride_k,
                ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """acc += A[rows_a, :] · A[rows_b, :]ᵀ, over the n features in BLOCK_K chunks."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, n, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < n
        a = tl.load(ptr + rows_a[:, None] * stride_r + k[None, :] * stride_k,
                    mask=mask_a[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(ptr + k[:, None] * stride_k + rows_b[None, :] * stride_r,
                    mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _linear_ghost_kernel(
        x_ptr, g_ptr, part_ptr,
        T, d, p, n_pairs,
        stride_xr, stride_xd, stride_gr, stride_gp,
        ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ghost norm (Li et al. 2021): ‖dY_iᵀ X_i‖²_F = ⟨X_i X_iᵀ, dY_i dY_iᵀ⟩_F.

    Program i·n_pairs + pair takes one block (tb, sb), sb ≤ tb, of sample i's T × T
    Gram matrices, forms X_i[tb] X_i[sb]ᵀ and dY_i[tb] dY_i[sb]ᵀ by tiled dots
    over the d and p features and stores their Frobenius inner product in
    part[i, pair], doubled off the diagonal since both Grams are symmetric.
    ‖G_i‖²_F = Σ_pair part[i, pair]; only a BLOCK_T × BLOCK_T block of each
    Gram matrix is ever held, in registers. Cost ≈ B·T²(d + p) flops (half of
    2BT²(d + p) by the symmetry) and B·n_pairs floats of partial sums.
    """
    # One grid axis: the second and third are limited to 65535 programs on CUDA.
    pid = tl.program_id(0)
    i = pid // n_pairs
    pair = pid % n_pairs
    # pair = tb(tb + 1)/2 + sb: float sqrt, then exact integer correction.
    tb = ((tl.sqrt(8.0 * pair + 1.0) - 1.0) * 0.5).to(tl.int32)
    tb = tl.where(tb * (tb + 1) // 2 > pair, tb - 1, tb)
    tb = tl.where((tb + 1) * (tb + 2) // 2 <= pair, tb + 1, tb)
    sb = pair - tb * (tb + 1) // 2

    offs = tl.arange(0, BLOCK_T)
    pos_t = tb * BLOCK_T + offs
    pos_s = sb * BLOCK_T + offs
    mask_t = pos_t < T
    mask_s = pos_s < T
    rows_t = (i * T + pos_t).to(tl.int64)
    rows_s = (i * T + pos_s).to(tl.int64)
    gram_x = tl.zeros((BLOCK_T, BLOCK_T), ACC)
    gram_x = _gram_block(gram_x, x_ptr, rows_t, rows_s, mask_t, mask_s, d, stride_xr, stride_xd,
                         ACC, UPCAST, PRECISION, BLOCK_K)
    gram_g = tl.zeros((BLOCK_T, BLOCK_T), ACC)
    gram_g = _gram_block(gram_g, g_ptr, rows_t, rows_s, mask_t, mask_s, p, stride_gr, stride_gp,
                         ACC, UPCAST, PRECISION, BLOCK_K)
    val = tl.sum(gram_x * gram_g)
    val = tl.where(tb == sb, val, 2.0 * val)
    tl.store(part_ptr + pid, val)


@triton.jit
def _sq_row_norms(ptr, rows, mask_b, n, stride_r, stride_k,
                  ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """‖A[row, :]‖² for each of the BLOCK_B rows."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_K), ACC)
    for k0 in range(0, n, BLOCK_K):
        k = k0 + offs_k
        v = tl.load(ptr + rows[:, None] * stride_r + k[None, :] * stride_k,
                    mask=mask_b[:, None] & (k < n)[None, :], other=0.0).to(ACC)
        acc += v * v
    return tl.sum(acc, axis=1)


@triton.jit
def _linear_goodfellow_kernel(
        x_ptr, g_ptr, out_ptr,
        B, d, p,
        stride_xr, stride_xd, stride_gr, stride_gp,
        ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """T = 1 (Goodfellow 2015): ‖dy_i x_iᵀ‖²_F = ‖x_i‖²·‖dy_i‖², for BLOCK_B samples.

    Cost 2B(d + p), one read of X and dY.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    rows = offs_b.to(tl.int64)
    sx = _sq_row_norms(x_ptr, rows, mask_b, d, stride_xr, stride_xd, ACC, BLOCK_B, BLOCK_K)
    sg = _sq_row_norms(g_ptr, rows, mask_b, p, stride_gr, stride_gp, ACC, BLOCK_B, BLOCK_K)
    tl.store(out_ptr + offs_b, sx * sg, mask=mask_b)


@triton.jit
def _linear_bias_kernel(
        g_ptr, b_ptr, part_ptr,
        B, T, p, samples_per_split,
        stride_gr, stride_gp, stride_bs,
        COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """Bias gradients: per sample s_i = Σ_t dY_i,t, part[P, i] = ‖s_i[P]‖², and
    b[s, P] = Σ_i s_i[P] over the samples of split s (COMPUTE_GRAD).

    Program (P, s) owns columns P and the samples of split s; the bias term of
    the norm is Σ_P part[P, i].
    """
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_t = tl.arange(0, BLOCK_T)
    mask_p = offs_p < p
    g_cols = g_ptr + offs_p[None, :].to(tl.int64) * stride_gp
    first = split * samples_per_split
    last = tl.minimum(first + samples_per_split, B)

    total = tl.zeros((BLOCK_P,), ACC)
    for i in range(first, last):
        acc = tl.zeros((BLOCK_T, BLOCK_P), ACC)
        for t0 in range(0, T, BLOCK_T):
            rows = (i * T + t0 + offs_t).to(tl.int64)
            mask = ((t0 + offs_t) < T)[:, None] & mask_p[None, :]
            acc += tl.load(g_cols + rows[:, None] * stride_gr, mask=mask, other=0.0).to(ACC)
        s = tl.sum(acc, axis=0)
        total += s
        tl.store(part_ptr + pid_p * B + i, tl.sum(s * s))
    if COMPUTE_GRAD:
        tl.store(b_ptr + split * stride_bs + offs_p, total.to(b_ptr.dtype.element_ty), mask=mask_p)
