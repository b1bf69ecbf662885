// Index and per-element maths of the CUDA Linear kernels (linear_kernels.cu).
//
// Everything is __host__ __device__ (GN_HD from common.h) and free of CUDA
// types, so host C++ can include this header: the CPU kernels may share it,
// and tests/test_cuda_compile.py runs these functions on the host, which is
// the only way code from the CUDA path executes on a machine without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace gradnoise {

GN_HD int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
GN_HD int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

// Goodfellow (2015), T = 1: G_i = dy_i x_iᵀ has rank one, so
// ‖G_i‖²_F = ‖x_i‖²·‖dy_i‖²; the bias gradient is dy_i itself.
template <typename A>
GN_HD A goodfellow_sq_norm(A x_sq, A dy_sq, bool with_bias) {
  return x_sq * dy_sq + (with_bias ? dy_sq : A(0));
}

// Ghost norm (Li et al. 2021): ‖G_i‖²_F = ⟨X_iX_iᵀ, dY_idY_iᵀ⟩_F, summed over
// tiles (row, col) of the two T×T Gram matrices. Both are symmetric, so only
// tiles with row <= col are formed; an off-diagonal tile stands for itself
// and its mirror image.
struct TilePair {
  int64_t row;
  int64_t col;
};

GN_HD int64_t ghost_num_tile_pairs(int64_t tiles_per_dim) {
  return tiles_per_dim * (tiles_per_dim + 1) / 2;
}

// The q-th pair, column by column: (0,0), (0,1), (1,1), (0,2), (1,2), ...
// Column c starts at c(c+1)/2. The square root only seeds c; the two loops
// correct the rounding of large q.
GN_HD TilePair ghost_tile_pair(int64_t q) {
  int64_t c = static_cast<int64_t>(
      (sqrt(8.0 * static_cast<double>(q) + 1.0) - 1.0) * 0.5);
  while (c > 0 && c * (c + 1) / 2 > q) --c;
  while ((c + 1) * (c + 2) / 2 <= q) ++c;
  return TilePair{q - c * (c + 1) / 2, c};
}

template <typename A>
GN_HD A ghost_pair_weight(TilePair t) {
  return t.row == t.col ? A(1) : A(2);
}

// A half-open range of rows of the flattened [B·T] dimension.
struct RowRange {
  int64_t begin;
  int64_t end;
};

// Rows handled by split `split` when `units` units of `unit_rows` rows each
// are dealt out `units_per_split` at a time. Per-sample norms need whole
// samples in one split (unit = sample, unit_rows = T); the plain weight
// gradient can split anywhere (unit = row).
GN_HD RowRange split_rows(int64_t split, int64_t units_per_split,
                          int64_t unit_rows, int64_t units) {
  const int64_t first = min_i64(split * units_per_split, units);
  const int64_t last = min_i64(first + units_per_split, units);
  return RowRange{first * unit_rows, last * unit_rows};
}

// Fused epilogue at a sample boundary (the "fused" method): the N entries of
// sample i's tile of G_i held by one thread are added to the weight-gradient
// accumulator, reset for the next sample, and their sum of squares returned,
// i.e. this thread's share of ‖G_i‖² restricted to the tile.
template <typename A, int N, bool kWeightGrad>
GN_HD A fold_sample_tile(A* sample, A* total) {
  A sq = A(0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int e = 0; e < N; ++e) {
    const A c = sample[e];
    sq += c * c;
    if (kWeightGrad) total[e] += c;
    sample[e] = A(0);
  }
  return sq;
}

}  // namespace gradnoise
