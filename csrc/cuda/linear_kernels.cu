// CUDA kernels for the per-sample squared gradient norms of a Linear layer
// y = x Wᵀ + b, and for the weight gradient they can be fused with.
//
// Sample i has input X_i [T, d] and output gradient dY_i [T, p] (rows i·T ..
// i·T+T-1 of the flattened, contiguous x [B·T, d] and grad_out [B·T, p]):
//
//   G_i = dY_iᵀ X_i [p, d]       n_i = ‖G_i‖²_F (+ ‖Σ_t dY_i,t‖² with a bias)
//   grad_weight = Σ_i G_i        grad_bias = Σ_i Σ_t dY_i,t
//
// n_i by one of three methods (docs/design.md §1; "auto" takes the cheapest by
// gradnoise::choose_linear_norm_method in common.h):
//   goodfellow  T = 1: ‖G_i‖² = ‖x_i‖²·‖dy_i‖²                 (Goodfellow 2015)
//   ghost       ‖G_i‖² = ⟨X_iX_iᵀ, dY_idY_iᵀ⟩_F, over T×T tiles  (Li et al. 2021)
//   fused       the weight-gradient GEMM Σ_r dY_rᵀX_r reduced over rows in
//               sample order; each block squares its tile of G_i when sample
//               i ends. Rochette et al. (2019) form every G_i in memory
//               (O(B·d·p)); here a G_i tile never leaves registers.
//
// All reductions run in a fixed order and every launch shape depends on the
// problem shape only, so results are bitwise reproducible, also across GPUs.
// Accumulation is in float (double for double inputs); half and bfloat16 are
// converted on load.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cuda/linear_launchers.h"
#include "cuda/device_common.cuh"
#include "cuda/linear_math.cuh"

namespace gradnoise {
namespace cuda {
namespace {


// Launch-shape policy. Constants rather than device queries, so that a shape
// is always cut the same way (see the reproducibility note above).
constexpr int64_t kTargetBlocks = 256;      // ~2 waves on 108-132 SM parts
constexpr int64_t kMaxGridStride = 1 << 20;  // grid-stride kernels
constexpr int64_t kMaxNormSplits = 1024;     // fused norms: no extra memory
constexpr int64_t kMaxWeightGradSplits = 16;  // each split: one p×d partial
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int64_t kMaxBiasGroups = 65535;
constexpr int64_t kMaxBiasGroupsWithGrad = 64;  // each group: one p partial
constexpr int64_t kMinRowsPerBiasGroup = 32;
constexpr size_t kWorkspaceAlign = 256;


template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterfly: every lane ends with the same sum, added in the same order.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over a block of kThreads threads (1-D, every thread calls it). Returns
// the total to every thread; `scratch` holds kThreads / 32 values.
template <int kThreads, typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  static_assert(kThreads % kWarp == 0, "whole warps only");
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  A total = A(0);
#pragma unroll
  for (int w = 0; w < kThreads / kWarp; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused at once
  return total;
}

// ---------------------------------------------------------------------------
// Goodfellow (2015), T = 1: n_i = ‖x_i‖²·‖dy_i‖² (+ ‖dy_i‖² with the bias).
// A group of kGroupThreads threads per sample: one warp when rows are short,
// the whole block when they are long enough to keep 256 threads busy.
// ---------------------------------------------------------------------------
constexpr int kGoodfellowThreads = 256;

template <typename scalar_t, int kGroupThreads>
__global__ void __launch_bounds__(kGoodfellowThreads)
    goodfellow_kernel(const scalar_t* __restrict__ x,
                      const scalar_t* __restrict__ g,
                      acc_t<scalar_t>* __restrict__ norms, int64_t B, int64_t d,
                      int64_t p, bool with_bias) {
  using A = acc_t<scalar_t>;
  constexpr int kGroups = kGoodfellowThreads / kGroupThreads;
  __shared__ A scratch[2][kGoodfellowThreads / kWarp];
  const int group = threadIdx.x / kGroupThreads;
  const int lane = threadIdx.x % kGroupThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kGroups + group; i < B;
       i += static_cast<int64_t>(gridDim.x) * kGroups) {
    const scalar_t* xi = x + i * d;
    const scalar_t* gi = g + i * p;
    A x_sq = A(0), g_sq = A(0);
    for (int64_t k = lane; k < d; k += kGroupThreads) {
      const A v = to_acc(xi[k]);
      x_sq += v * v;
    }
    for (int64_t k = lane; k < p; k += kGroupThreads) {
      const A v = to_acc(gi[k]);
      g_sq += v * v;
    }
    if constexpr (kGroupThreads == kWarp) {
      x_sq = warp_sum(x_sq);
      g_sq = warp_sum(g_sq);
    } else {
      x_sq = block_sum<kGroupThreads>(x_sq, scratch[0]);
      g_sq = block_sum<kGroupThreads>(g_sq, scratch[1]);
    }
    if (lane == 0) norms[i] = goodfellow_sq_norm(x_sq, g_sq, with_bias);
  }
}

// ---------------------------------------------------------------------------
// Ghost norm (Li et al. 2021): ‖G_i‖²_F = Σ_{s,t} (X_iX_iᵀ)_st (dY_idY_iᵀ)_st.
// One block per (sample, BT×BT tile pair (row <= col) of the T×T Grams): it
// forms the tile of X_iX_iᵀ (reduction over d) and of dY_idY_iᵀ (over p) in
// registers, TM×TM per thread, and writes Σ tile⊙tile, doubled off the
// diagonal, to its partial slot. No B×T×T buffer exists at any time.
// ---------------------------------------------------------------------------
constexpr int kGhostBK = 32;

template <int BT, int TM>
struct GhostTile {
  static constexpr int kDim = BT / TM;  // threads along each tile side
  static constexpr int kThreads = kDim * kDim;
  static constexpr int kLoads = BT * kGhostBK / kThreads;
  static_assert(BT % TM == 0 && (BT * kGhostBK) % kThreads == 0, "tile");
};

// c = rows[s0 : s0+ns] · rows[t0 : t0+nt]ᵀ (one sample's rows, K columns),
// strided register blocking: thread (ty, tx) owns rows ty + u·kDim and
// columns tx + v·kDim, so a warp reads consecutive shared-memory words.
// Stages [BT, BK] chunks transposed into shared memory (row + 1 padding keeps
// the transposing stores free of bank conflicts); on the diagonal both
// operands are the same rows and are loaded once.
template <typename scalar_t, int BT, int TM>
__device__ __forceinline__ void gram_tile(
    const scalar_t* __restrict__ rows, int64_t K, int64_t s0, int ns,
    int64_t t0, int nt, bool diag, acc_t<scalar_t> (*As)[BT + 1],
    acc_t<scalar_t> (*Bs)[BT + 1], acc_t<scalar_t> (&c)[TM][TM]) {
  using A = acc_t<scalar_t>;
  using Tile = GhostTile<BT, TM>;
  const int tid = threadIdx.x;
  const int tx = tid % Tile::kDim, ty = tid / Tile::kDim;
#pragma unroll
  for (int u = 0; u < TM; ++u)
#pragma unroll
    for (int v = 0; v < TM; ++v) c[u][v] = A(0);
  const A(*Bsrc)[BT + 1] = diag ? As : Bs;
  for (int64_t k0 = 0; k0 < K; k0 += kGhostBK) {
#pragma unroll
    for (int j = 0; j < Tile::kLoads; ++j) {
      const int e = tid + j * Tile::kThreads;
      const int row = e / kGhostBK, kk = e % kGhostBK;
      const int64_t k = k0 + kk;
      As[kk][row] =
          (row < ns && k < K) ? to_acc(rows[(s0 + row) * K + k]) : A(0);
      if (!diag)
        Bs[kk][row] =
            (row < nt && k < K) ? to_acc(rows[(t0 + row) * K + k]) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kGhostBK; ++kk) {
      A a[TM], b[TM];
#pragma unroll
      for (int u = 0; u < TM; ++u) {
        a[u] = As[kk][ty + u * Tile::kDim];
        b[u] = Bsrc[kk][tx + u * Tile::kDim];
      }
#pragma unroll
      for (int u = 0; u < TM; ++u)
#pragma unroll
        for (int v = 0; v < TM; ++v) c[u][v] += a[u] * b[v];
    }
    __syncthreads();
  }
}

template <typename scalar_t, int BT, int TM>
__global__ void __launch_bounds__(GhostTile<BT, TM>::kThreads)
    ghost_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                 int64_t B, int64_t T, int64_t d, int64_t p,
                 acc_t<scalar_t>* __restrict__ partial,
                 int64_t partial_stride) {
  using A = acc_t<scalar_t>;
  using Tile = GhostTile<BT, TM>;
  __shared__ A As[kGhostBK][BT + 1];
  __shared__ A Bs[kGhostBK][BT + 1];
  __shared__ A scratch[Tile::kThreads / kWarp];
  const int64_t pairs = ghost_num_tile_pairs(ceil_div(T, BT));
  const int64_t tasks = B * pairs;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t i = task / pairs;
    const int64_t q = task - i * pairs;
    const TilePair tp = ghost_tile_pair(q);
    const int64_t s0 = tp.row * BT, t0 = tp.col * BT;
    const int ns = static_cast<int>(min_i64(BT, T - s0));
    const int nt = static_cast<int>(min_i64(BT, T - t0));
    const bool diag = tp.row == tp.col;
    A cx[TM][TM], cy[TM][TM];
    gram_tile<scalar_t, BT, TM>(x + i * T * d, d, s0, ns, t0, nt, diag, As,
                                Bs, cx);
    gram_tile<scalar_t, BT, TM>(g + i * T * p, p, s0, ns, t0, nt, diag, As,
                                Bs, cy);
    A dot = A(0);
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int v = 0; v < TM; ++v) dot += cx[u][v] * cy[u][v];
    dot = block_sum<Tile::kThreads>(dot, scratch);
    if (threadIdx.x == 0)
      partial[i * partial_stride + q] = ghost_pair_weight<A>(tp) * dot;
  }
}

// ---------------------------------------------------------------------------
// Fused weight gradient and per-sample norms ("fused", docs/design.md §1).
//
// grad_weight[m, n] = Σ_r dY[r, m]·X[r, n] over the rows r of the flattened
// [B·T] dimension: a GEMM whose operands are both stored reduction-major, so
// a [BK, BM] chunk of dY and a [BK, BN] chunk of X load coalesced, straight
// into shared memory. Each block owns one BM×BN tile of grad_weight, each
// thread a strided TM×TN piece of it, and walks the rows of its split in
// order, double-buffered (the next chunk is fetched into registers while the
// current one is multiplied). With kNorms the split holds whole samples and
// the product of the current sample accumulates alone; at the sample's last
// row the tile is folded into the weight-gradient accumulator and its sum of
// squares goes to partial[i, tile]. reduce_rows_kernel later adds the tiles
// of each sample: n_i = Σ_tiles ‖tile of G_i‖², extra cost ≈ 2·B·d·p on top
// of the 2·B·T·d·p of the GEMM, extra memory B × #tiles.
// Without kNorms it is the plain weight-gradient GEMM, split anywhere.
// Several splits of the row range give one p×d partial each (reduced by
// sum_splits_kernel); a single split writes grad_weight directly.
// ---------------------------------------------------------------------------
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct GemmTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int kThreadsM = BM / TM, kThreadsN = BN / TN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  static constexpr int kWarps = kThreads / kWarp;
  static constexpr int kLoadsA = BK * BM / kThreads;
  static constexpr int kLoadsB = BK * BN / kThreads;
  static_assert(kThreads % kWarp == 0, "whole warps");
  static_assert((BK * BM) % kThreads == 0 && (BK * BN) % kThreads == 0,
                "every thread loads the same number of elements");
};
using TileLarge = GemmTile<128, 128, 8, 8, 8>;  // float accumulators
using TileSmall = GemmTile<64, 64, 8, 4, 4>;    // narrow layers, double

template <typename scalar_t, typename Tile, bool kNorms, bool kWeightGrad>
__global__ void __launch_bounds__(Tile::kThreads)
    fused_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                 int64_t B, int64_t T, int64_t d, int64_t p,
                 int64_t units_per_split, acc_t<scalar_t>* __restrict__ partial,
                 int64_t partial_stride, scalar_t* __restrict__ grad_weight,
                 acc_t<scalar_t>* __restrict__ grad_weight_parts) {
  static_assert(kNorms || kWeightGrad, "nothing to compute");
  using A = acc_t<scalar_t>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK;
  constexpr int TM = Tile::TM, TN = Tile::TN;
  constexpr int kThreads = Tile::kThreads;

  __shared__ A As[2][BK][BM];
  __shared__ A Bs[2][BK][BN];
  // Per-warp squared norms of the samples that end in a chunk (at most BK).
  __shared__ A ends[2][kNorms ? BK : 1][Tile::kWarps];

  const int tid = threadIdx.x;
  const int tx = tid % Tile::kThreadsN, ty = tid / Tile::kThreadsN;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int64_t tile = blockIdx.x;
  const int64_t tiles_n = ceil_div(d, BN);
  const int64_t m0 = (tile / tiles_n) * BM, n0 = (tile % tiles_n) * BN;
  const int64_t split = blockIdx.y;
  const RowRange rows = kNorms ? split_rows(split, units_per_split, T, B)
                               : split_rows(split, units_per_split, 1, B * T);
  const int64_t chunks = ceil_div(rows.end - rows.begin, BK);

  A acc[TM * TN];    // the current sample's tile (or the whole sum)
  A total[TM * TN];  // Σ over finished samples (kNorms && kWeightGrad)
#pragma unroll
  for (int e = 0; e < TM * TN; ++e) acc[e] = total[e] = A(0);

  A ra[Tile::kLoadsA], rb[Tile::kLoadsB];
  auto fetch = [&](int64_t chunk) {
    const int64_t r0 = rows.begin + chunk * BK;
#pragma unroll
    for (int j = 0; j < Tile::kLoadsA; ++j) {
      const int e = tid + j * kThreads;
      const int64_t r = r0 + e / BM, m = m0 + e % BM;
      ra[j] = (r < rows.end && m < p) ? to_acc(g[r * p + m]) : A(0);
    }
#pragma unroll
    for (int j = 0; j < Tile::kLoadsB; ++j) {
      const int e = tid + j * kThreads;
      const int64_t r = r0 + e / BN, n = n0 + e % BN;
      rb[j] = (r < rows.end && n < d) ? to_acc(x[r * d + n]) : A(0);
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int j = 0; j < Tile::kLoadsA; ++j) {
      const int e = tid + j * kThreads;
      As[buf][e / BM][e % BM] = ra[j];
    }
#pragma unroll
    for (int j = 0; j < Tile::kLoadsB; ++j) {
      const int e = tid + j * kThreads;
      Bs[buf][e / BN][e % BN] = rb[j];
    }
  };
  auto mac_row = [&](int buf, int kk) {
    A a[TM], b[TN];
#pragma unroll
    for (int u = 0; u < TM; ++u) a[u] = As[buf][kk][ty + u * Tile::kThreadsM];
#pragma unroll
    for (int v = 0; v < TN; ++v) b[v] = Bs[buf][kk][tx + v * Tile::kThreadsN];
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int v = 0; v < TN; ++v) acc[u * TN + v] += a[u] * b[v];
  };
  // Rows left in the current sample, the sample, and the end of the split.
  int64_t rows_left = T, sample = 0, sample_end = 0;
  if constexpr (kNorms) {
    sample = rows.begin / T;
    sample_end = rows.end / T;
  }
  // Samples that ended in the previous chunk: how many, and the first.
  int done_prev = 0;
  int64_t first_prev = 0;
  auto publish = [&](int buf, int count, int64_t first) {
    if (tid < count) {
      A s = A(0);
#pragma unroll
      for (int w = 0; w < Tile::kWarps; ++w) s += ends[buf][tid][w];
      partial[(first + tid) * partial_stride + tile] = s;
    }
  };

  if (chunks > 0) {
    fetch(0);
    stash(0);
  }
  __syncthreads();
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int buf = static_cast<int>(chunk & 1);
    if (chunk + 1 < chunks) fetch(chunk + 1);
    if constexpr (kNorms) {
      if (chunk > 0) publish(buf ^ 1, done_prev, first_prev);
    }
    int done = 0;
    const int64_t first = sample;
    if constexpr (!kNorms) {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) mac_row(buf, kk);
    } else if (rows_left > BK) {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) mac_row(buf, kk);
      rows_left -= BK;
    } else {
      // A sample ends inside this chunk: multiply up to each boundary, then
      // fold. Every condition is uniform over the block.
      int kk = 0;
      while (kk < BK && sample < sample_end) {
        const int run = static_cast<int>(min_i64(BK - kk, rows_left));
        for (int u = 0; u < run; ++u) mac_row(buf, kk + u);
        kk += run;
        rows_left -= run;
        if (rows_left == 0) {
          A sq = fold_sample_tile<A, TM * TN, kWeightGrad>(acc, total);
          sq = warp_sum(sq);
          if (lane == 0) ends[buf][done][warp] = sq;
          ++done;
          ++sample;
          rows_left = T;
        }
      }
    }
    done_prev = done;
    first_prev = first;
    if (chunk + 1 < chunks) stash(buf ^ 1);
    __syncthreads();
  }
  if constexpr (kNorms) {
    if (chunks > 0) publish(static_cast<int>((chunks - 1) & 1), done_prev,
                            first_prev);
  }

  if constexpr (kWeightGrad) {
    const int64_t plane = p * d;
#pragma unroll
    for (int u = 0; u < TM; ++u) {
      const int64_t m = m0 + ty + u * Tile::kThreadsM;
      if (m >= p) continue;
#pragma unroll
      for (int v = 0; v < TN; ++v) {
        const int64_t n = n0 + tx + v * Tile::kThreadsN;
        if (n >= d) continue;
        const A value = kNorms ? total[u * TN + v] : acc[u * TN + v];
        if (grad_weight_parts != nullptr)
          grad_weight_parts[split * plane + m * d + n] = value;
        else
          grad_weight[m * d + n] = from_acc<scalar_t>(value);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Bias: column sums of dY over a sample (S_i = Σ_t dY_i,t, for ‖S_i‖² and
// grad_bias = Σ_i S_i) or over a flat range of rows (grad_bias only).
// A block covers kBiasCols columns: each warp reads rows of 32 consecutive
// columns (twice), 8 warps take every 8th row, and warp 0 adds the 8 partial
// column sums in order. Blocks along y take consecutive groups of samples
// (rows); with several groups grad_bias is reduced by sum_splits_kernel.
// ---------------------------------------------------------------------------
constexpr int kBiasRowLanes = 8;
constexpr int kBiasCols = 2 * kWarp;
constexpr int kBiasThreads = kBiasRowLanes * kWarp;

template <typename scalar_t, bool kPerSample, bool kGradBias>
__global__ void __launch_bounds__(kBiasThreads)
    bias_kernel(const scalar_t* __restrict__ g, int64_t B, int64_t T,
                int64_t p, int64_t units_per_group,
                acc_t<scalar_t>* __restrict__ partial, int64_t partial_stride,
                int64_t partial_offset, scalar_t* __restrict__ grad_bias,
                acc_t<scalar_t>* __restrict__ grad_bias_parts) {
  using A = acc_t<scalar_t>;
  __shared__ A col_sums[kBiasRowLanes][kBiasCols];
  const int lane = threadIdx.x % kWarp, row_lane = threadIdx.x / kWarp;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kBiasCols + lane;
  const int64_t c1 = c0 + kWarp;
  const bool ok0 = c0 < p, ok1 = c1 < p;
  const int64_t unit_rows = kPerSample ? T : 1;
  const int64_t units = kPerSample ? B : B * T;
  const RowRange group =
      split_rows(blockIdx.y, units_per_group, unit_rows, units);
  // A segment is one sample, or the group's whole row range.
  const int64_t segment_rows = kPerSample ? T : group.end - group.begin;
  A gb0 = A(0), gb1 = A(0);
  for (int64_t r_begin = group.begin; r_begin < group.end;
       r_begin += segment_rows) {
    A s0 = A(0), s1 = A(0);
    for (int64_t r = r_begin + row_lane; r < r_begin + segment_rows;
         r += kBiasRowLanes) {
      const scalar_t* row = g + r * p;
      if (ok0) s0 += to_acc(row[c0]);
      if (ok1) s1 += to_acc(row[c1]);
    }
    col_sums[row_lane][lane] = s0;
    col_sums[row_lane][lane + kWarp] = s1;
    __syncthreads();
    if (row_lane == 0) {
      A t0 = A(0), t1 = A(0);
#pragma unroll
      for (int k = 0; k < kBiasRowLanes; ++k) {
        t0 += col_sums[k][lane];
        t1 += col_sums[k][lane + kWarp];
      }
      if constexpr (kGradBias) {
        gb0 += t0;
        gb1 += t1;
      }
      if constexpr (kPerSample) {
        const A sq = warp_sum(t0 * t0 + t1 * t1);
        if (lane == 0)
          partial[(r_begin / T) * partial_stride + partial_offset +
                  blockIdx.x] = sq;
      }
    }
    __syncthreads();
  }
  if constexpr (kGradBias) {
    if (row_lane == 0) {
      if (grad_bias_parts != nullptr) {
        A* dst = grad_bias_parts + static_cast<int64_t>(blockIdx.y) * p;
        if (ok0) dst[c0] = gb0;
        if (ok1) dst[c1] = gb1;
      } else {
        if (ok0) grad_bias[c0] = from_acc<scalar_t>(gb0);
        if (ok1) grad_bias[c1] = from_acc<scalar_t>(gb1);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Deterministic finishing reductions.
// ---------------------------------------------------------------------------

// out[r] = Σ_c partial[r, c]: one warp per row, fixed order.
template <typename A>
__global__ void __launch_bounds__(256)
    reduce_rows_kernel(const A* __restrict__ partial, A* __restrict__ out,
                       int64_t rows, int64_t width) {
  constexpr int kRowsPerBlock = 256 / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
       r < rows; r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    A s = A(0);
    for (int64_t c = lane; c < width; c += kWarp) s += partial[r * width + c];
    s = warp_sum(s);
    if (lane == 0) out[r] = s;
  }
}

// out[e] = Σ_k parts[k, e] in order of k, converted to the output dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    sum_splits_kernel(const acc_t<scalar_t>* __restrict__ parts,
                      scalar_t* __restrict__ out, int64_t n, int64_t splits) {
  using A = acc_t<scalar_t>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < n; e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int64_t k = 0; k < splits; ++k) s += parts[k * n + e];
    out[e] = from_acc<scalar_t>(s);
  }
}

// ---------------------------------------------------------------------------
// Host side: how a call is cut into launches, and its scratch memory.
// ---------------------------------------------------------------------------
struct GemmPlan {
  bool active = false;
  bool norms = false;        // fused: per-sample partials
  bool weight_grad = false;  // writes grad_weight
  bool large = false;        // TileLarge, else TileSmall
  int64_t tiles = 0;         // grid.x
  int64_t splits = 1;        // grid.y
  int64_t units_per_split = 0;
};

struct BiasPlan {
  bool active = false;
  bool per_sample = false;  // writes ‖S_i‖² partials
  bool grad_bias = false;
  int64_t col_tiles = 0;  // grid.x
  int64_t groups = 1;     // grid.y
  int64_t units_per_group = 0;
};

struct Plan {
  bool valid = true;
  int ghost_tile = 0;        // BT, if the ghost kernel runs
  int64_t main_width = 0;    // partial columns of ghost pairs / fused tiles
  int64_t width = 0;         // + bias column tiles
  bool reduce_norms = false;  // partial → norms
  GemmPlan gemm;
  BiasPlan bias;
  size_t partial_offset = 0, gw_parts_offset = 0, gb_parts_offset = 0;
  size_t bytes = 0;
};

size_t align_up(size_t n) {
  return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

// Cut `units` units of `unit_rows` rows into at most `max_groups` groups so
// that grid ≈ kTargetBlocks, each group keeps >= min_rows rows, and no group
// is empty. Returns the units per group; `groups` receives the count.
int64_t plan_groups(int64_t blocks_per_group, int64_t units, int64_t unit_rows,
                    int64_t max_groups, int64_t min_rows, int64_t* groups) {
  int64_t n = ceil_div(kTargetBlocks, max_i64(blocks_per_group, 1));
  n = min_i64(n, max_groups);
  n = min_i64(n, max_i64(1, units * unit_rows / min_rows));
  n = max_i64(1, min_i64(n, units));
  const int64_t per = max_i64(1, ceil_div(units, n));
  *groups = max_i64(1, ceil_div(units, per));
  return per;
}

GemmPlan plan_gemm(int64_t B, int64_t T, int64_t d, int64_t p, bool norms,
                   bool weight_grad, bool is_double) {
  GemmPlan g;
  g.active = true;
  g.norms = norms;
  g.weight_grad = weight_grad;
  const int64_t tiles_large =
      ceil_div(p, TileLarge::BM) * ceil_div(d, TileLarge::BN);
  // The large tile (twice the arithmetic intensity) only when it alone fills
  // the GPU; otherwise more, smaller tiles, rather than more row splits,
  // each of which costs the weight gradient a p×d partial.
  g.large = !is_double && min_i64(d, p) > TileSmall::BM &&
            tiles_large >= kTargetBlocks / 2;
  g.tiles = g.large ? tiles_large
                    : ceil_div(p, TileSmall::BM) * ceil_div(d, TileSmall::BN);
  const int64_t max_splits = weight_grad ? kMaxWeightGradSplits : kMaxNormSplits;
  g.units_per_split = plan_groups(g.tiles, norms ? B : B * T, norms ? T : 1,
                                  max_splits, kMinRowsPerSplit, &g.splits);
  return g;
}

// One diagonal tile while T <= 64, so every row is read once; 64 beyond.
int ghost_tile_rows(int64_t T) { return T <= 16 ? 16 : T <= 32 ? 32 : 64; }

Plan make_plan(int64_t B, int64_t T, int64_t d, int64_t p, DType dtype,
               bool with_bias, NormMethod method, bool with_weight_grad) {
  Plan pl;
  if (B < 0 || T < 0 || d < 0 || p < 0 ||
      (method == NormMethod::kGoodfellow && T != 1)) {
    pl.valid = false;
    return pl;
  }
  if (B == 0) return pl;
  const bool is_double = dtype == DType::kFloat64;
  const size_t acc_bytes = is_double ? sizeof(double) : sizeof(float);
  const int64_t R = B * T;
  const bool has_product = R > 0 && d > 0 && p > 0;
  const bool has_bias_rows = with_bias && R > 0 && p > 0;

  if (method != NormMethod::kGoodfellow) {
    pl.reduce_norms = true;
    if (has_product && method == NormMethod::kGhost) {
      pl.ghost_tile = ghost_tile_rows(T);
      pl.main_width = ghost_num_tile_pairs(ceil_div(T, pl.ghost_tile));
    } else if (has_product) {
      pl.gemm = plan_gemm(B, T, d, p, true, with_weight_grad, is_double);
      pl.main_width = pl.gemm.tiles;
    }
  }
  if (with_weight_grad && has_product && !pl.gemm.active)
    pl.gemm = plan_gemm(B, T, d, p, false, true, is_double);

  pl.bias.per_sample = pl.reduce_norms && has_bias_rows;
  pl.bias.grad_bias = with_weight_grad && has_bias_rows;
  pl.bias.active = pl.bias.per_sample || pl.bias.grad_bias;
  if (pl.bias.active) {
    pl.bias.col_tiles = ceil_div(p, kBiasCols);
    pl.bias.units_per_group = plan_groups(
        pl.bias.col_tiles, pl.bias.per_sample ? B : R,
        pl.bias.per_sample ? T : 1,
        pl.bias.grad_bias ? kMaxBiasGroupsWithGrad : kMaxBiasGroups,
        kMinRowsPerBiasGroup, &pl.bias.groups);
  }
  pl.width = pl.main_width + (pl.bias.per_sample ? pl.bias.col_tiles : 0);

  size_t off = 0;
  if (pl.reduce_norms && pl.width > 0) {
    pl.partial_offset = off;
    off += align_up(static_cast<size_t>(B * pl.width) * acc_bytes);
  }
  if (pl.gemm.active && pl.gemm.weight_grad && pl.gemm.splits > 1) {
    pl.gw_parts_offset = off;
    off += align_up(static_cast<size_t>(pl.gemm.splits * p * d) * acc_bytes);
  }
  if (pl.bias.grad_bias && pl.bias.groups > 1) {
    pl.gb_parts_offset = off;
    off += align_up(static_cast<size_t>(pl.bias.groups * p) * acc_bytes);
  }
  pl.bytes = off;
  return pl;
}

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(max_i64(1, min_i64(blocks, kMaxGridStride)));
}

template <typename scalar_t, typename Tile, bool kNorms, bool kWeightGrad>
cudaError_t launch_fused(const GemmPlan& gp, const scalar_t* x,
                         const scalar_t* g, int64_t B, int64_t T, int64_t d,
                         int64_t p, acc_t<scalar_t>* partial,
                         int64_t partial_stride, scalar_t* grad_weight,
                         acc_t<scalar_t>* grad_weight_parts,
                         cudaStream_t stream) {
  if (gp.tiles > INT32_MAX || gp.splits > 65535)
    return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gp.tiles),
                  static_cast<unsigned>(gp.splits));
  fused_kernel<scalar_t, Tile, kNorms, kWeightGrad>
      <<<grid, Tile::kThreads, 0, stream>>>(
          x, g, B, T, d, p, gp.units_per_split, partial, partial_stride,
          grad_weight, grad_weight_parts);
  return cudaGetLastError();
}

template <typename scalar_t, typename Tile>
cudaError_t launch_fused_tile(const GemmPlan& gp, const scalar_t* x,
                              const scalar_t* g, int64_t B, int64_t T,
                              int64_t d, int64_t p, acc_t<scalar_t>* partial,
                              int64_t partial_stride, scalar_t* grad_weight,
                              acc_t<scalar_t>* grad_weight_parts,
                              cudaStream_t stream) {
  if (gp.norms && gp.weight_grad)
    return launch_fused<scalar_t, Tile, true, true>(
        gp, x, g, B, T, d, p, partial, partial_stride, grad_weight,
        grad_weight_parts, stream);
  if (gp.norms)
    return launch_fused<scalar_t, Tile, true, false>(
        gp, x, g, B, T, d, p, partial, partial_stride, grad_weight,
        grad_weight_parts, stream);
  return launch_fused<scalar_t, Tile, false, true>(
      gp, x, g, B, T, d, p, partial, partial_stride, grad_weight,
      grad_weight_parts, stream);
}

template <typename scalar_t>
cudaError_t launch_ghost(int bt, const scalar_t* x, const scalar_t* g,
                         int64_t B, int64_t T, int64_t d, int64_t p,
                         acc_t<scalar_t>* partial, int64_t partial_stride,
                         cudaStream_t stream) {
  const int64_t blocks = B * ghost_num_tile_pairs(ceil_div(T, bt));
  switch (bt) {
    case 16:
      ghost_kernel<scalar_t, 16, 2>
          <<<grid_size(blocks), GhostTile<16, 2>::kThreads, 0, stream>>>(
              x, g, B, T, d, p, partial, partial_stride);
      break;
    case 32:
      ghost_kernel<scalar_t, 32, 2>
          <<<grid_size(blocks), GhostTile<32, 2>::kThreads, 0, stream>>>(
              x, g, B, T, d, p, partial, partial_stride);
      break;
    default:
      ghost_kernel<scalar_t, 64, 4>
          <<<grid_size(blocks), GhostTile<64, 4>::kThreads, 0, stream>>>(
              x, g, B, T, d, p, partial, partial_stride);
      break;
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_bias(const BiasPlan& bp, const scalar_t* g, int64_t B,
                        int64_t T, int64_t p, acc_t<scalar_t>* partial,
                        int64_t partial_stride, int64_t partial_offset,
                        scalar_t* grad_bias, acc_t<scalar_t>* grad_bias_parts,
                        cudaStream_t stream) {
  if (bp.col_tiles > INT32_MAX || bp.groups > 65535)
    return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(bp.col_tiles),
                  static_cast<unsigned>(bp.groups));
  if (bp.per_sample && bp.grad_bias)
    bias_kernel<scalar_t, true, true><<<grid, kBiasThreads, 0, stream>>>(
        g, B, T, p, bp.units_per_group, partial, partial_stride,
        partial_offset, grad_bias, grad_bias_parts);
  else if (bp.per_sample)
    bias_kernel<scalar_t, true, false><<<grid, kBiasThreads, 0, stream>>>(
        g, B, T, p, bp.units_per_group, partial, partial_stride,
        partial_offset, grad_bias, grad_bias_parts);
  else
    bias_kernel<scalar_t, false, true><<<grid, kBiasThreads, 0, stream>>>(
        g, B, T, p, bp.units_per_group, partial, partial_stride,
        partial_offset, grad_bias, grad_bias_parts);
  return cudaGetLastError();
}

// Everything one call enqueues; want_grads: the weight-gradient op.
template <typename scalar_t>
cudaError_t run(const Plan& pl, const scalar_t* x, const scalar_t* g,
                scalar_t* grad_weight, scalar_t* grad_bias,
                acc_t<scalar_t>* norms, unsigned char* workspace, int64_t B,
                int64_t T, int64_t d, int64_t p, bool with_bias,
                NormMethod method, bool want_grads, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  // Gradients no kernel writes (no rows, or nothing to multiply) are zero.
  if (want_grads && p * d > 0 && !(pl.gemm.active && pl.gemm.weight_grad))
    GN_CUDA_TRY(cudaMemsetAsync(grad_weight, 0,
                                static_cast<size_t>(p * d) * sizeof(scalar_t),
                                stream));
  if (want_grads && with_bias && p > 0 && !pl.bias.grad_bias)
    GN_CUDA_TRY(cudaMemsetAsync(
        grad_bias, 0, static_cast<size_t>(p) * sizeof(scalar_t), stream));
  if (B == 0) return cudaSuccess;

  A* partial = reinterpret_cast<A*>(workspace + pl.partial_offset);
  A* gw_parts = pl.gemm.weight_grad && pl.gemm.splits > 1
                    ? reinterpret_cast<A*>(workspace + pl.gw_parts_offset)
                    : nullptr;
  A* gb_parts = pl.bias.grad_bias && pl.bias.groups > 1
                    ? reinterpret_cast<A*>(workspace + pl.gb_parts_offset)
                    : nullptr;

  if (method == NormMethod::kGoodfellow) {
    // Rows long enough for 256 threads per sample, or too few samples to
    // fill the GPU a warp each: one block per sample.
    if (d + p >= 2048 || B < kTargetBlocks * 8) {
      goodfellow_kernel<scalar_t, kGoodfellowThreads>
          <<<grid_size(B), kGoodfellowThreads, 0, stream>>>(x, g, norms, B, d,
                                                           p, with_bias);
    } else {
      goodfellow_kernel<scalar_t, kWarp>
          <<<grid_size(ceil_div(B, kGoodfellowThreads / kWarp)),
             kGoodfellowThreads, 0, stream>>>(x, g, norms, B, d, p,
                                              with_bias);
    }
    GN_CUDA_TRY(cudaGetLastError());
  }
  if (pl.ghost_tile > 0)
    GN_CUDA_TRY(launch_ghost<scalar_t>(pl.ghost_tile, x, g, B, T, d, p,
                                       partial, pl.width, stream));
  if (pl.gemm.active) {
    scalar_t* gw = pl.gemm.weight_grad && gw_parts == nullptr ? grad_weight
                                                              : nullptr;
    if constexpr (std::is_same<scalar_t, double>::value) {
      GN_CUDA_TRY((launch_fused_tile<scalar_t, TileSmall>(
          pl.gemm, x, g, B, T, d, p, partial, pl.width, gw, gw_parts,
          stream)));
    } else {
      if (pl.gemm.large)
        GN_CUDA_TRY((launch_fused_tile<scalar_t, TileLarge>(
            pl.gemm, x, g, B, T, d, p, partial, pl.width, gw, gw_parts,
            stream)));
      else
        GN_CUDA_TRY((launch_fused_tile<scalar_t, TileSmall>(
            pl.gemm, x, g, B, T, d, p, partial, pl.width, gw, gw_parts,
            stream)));
    }
  }
  if (pl.bias.active)
    GN_CUDA_TRY(launch_bias<scalar_t>(
        pl.bias, g, B, T, p, partial, pl.width, pl.main_width,
        gb_parts == nullptr ? grad_bias : nullptr, gb_parts, stream));
  if (pl.reduce_norms) {
    reduce_rows_kernel<A>
        <<<grid_size(ceil_div(B, 256 / kWarp)), 256, 0, stream>>>(
            partial, norms, B, pl.width);
    GN_CUDA_TRY(cudaGetLastError());
  }
  if (gw_parts != nullptr) {
    sum_splits_kernel<scalar_t><<<grid_size(ceil_div(p * d, 256)), 256, 0,
                                  stream>>>(gw_parts, grad_weight, p * d,
                                            pl.gemm.splits);
    GN_CUDA_TRY(cudaGetLastError());
  }
  if (gb_parts != nullptr) {
    sum_splits_kernel<scalar_t><<<grid_size(ceil_div(p, 256)), 256, 0,
                                  stream>>>(gb_parts, grad_bias, p,
                                            pl.bias.groups);
    GN_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

cudaError_t dispatch(const void* x, const void* grad_out, void* grad_weight,
                     void* grad_bias, void* norms, void* workspace,
                     size_t workspace_bytes, int64_t B, int64_t T, int64_t d,
                     int64_t p, DType dtype, bool with_bias, NormMethod method,
                     bool with_weight_grad, cudaStream_t stream) {
  const Plan pl =
      make_plan(B, T, d, p, dtype, with_bias, method, with_weight_grad);
  if (!pl.valid || workspace_bytes < pl.bytes ||
      (pl.bytes > 0 && workspace == nullptr) ||
      (with_weight_grad && with_bias && p > 0 && grad_bias == nullptr))
    return cudaErrorInvalidValue;
  auto* ws = static_cast<unsigned char*>(workspace);
  return dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    return run<E>(pl, static_cast<const E*>(x), static_cast<const E*>(grad_out),
                  static_cast<E*>(grad_weight), static_cast<E*>(grad_bias),
                  static_cast<acc_t<E>*>(norms), ws, B, T, d, p, with_bias, method,
                  with_weight_grad, stream);
  });
}

}  // namespace

size_t linear_sq_norms_workspace_bytes(int64_t B, int64_t T, int64_t d,
                                       int64_t p, DType dtype, bool with_bias,
                                       NormMethod method) {
  return make_plan(B, T, d, p, dtype, with_bias, method, false).bytes;
}

cudaError_t launch_linear_sq_norms(const void* x, const void* grad_out,
                                   void* norms, void* workspace,
                                   size_t workspace_bytes, int64_t B,
                                   int64_t T, int64_t d, int64_t p,
                                   DType dtype, bool with_bias,
                                   NormMethod method, cudaStream_t stream) {
  return dispatch(x, grad_out, nullptr, nullptr, norms, workspace,
                  workspace_bytes, B, T, d, p, dtype, with_bias, method, false,
                  stream);
}

size_t linear_weight_grad_and_sq_norms_workspace_bytes(
    int64_t B, int64_t T, int64_t d, int64_t p, DType dtype, bool with_bias,
    NormMethod method) {
  return make_plan(B, T, d, p, dtype, with_bias, method, true).bytes;
}

cudaError_t launch_linear_weight_grad_and_sq_norms(
    const void* x, const void* grad_out, void* grad_weight, void* grad_bias,
    void* norms, void* workspace, size_t workspace_bytes, int64_t B,
    int64_t T, int64_t d, int64_t p, DType dtype, bool with_bias,
    NormMethod method, cudaStream_t stream) {
  if (grad_weight == nullptr && p * d > 0) return cudaErrorInvalidValue;
  return dispatch(x, grad_out, grad_weight, grad_bias, norms, workspace,
                  workspace_bytes, B, T, d, p, dtype, with_bias, method, true,
                  stream);
}

}  // namespace cuda
}  // namespace gradnoise
