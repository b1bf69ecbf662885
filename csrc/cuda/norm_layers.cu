// CUDA kernels for the per-sample squared gradient norms of normalisation
// layers' affine parameters (Gray et al. 2024, "Normalization Layer
// Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in
// Transformers"):
//
//   LayerNorm / RMSNorm, x, dY [B, T, C]:  gγ_b = Σ_t dY_b,t ⊙ x̂_b,t,  gβ_b = Σ_t dY_b,t
//   GroupNorm, x, dY [B, C, S]:           gγ_b[c] = Σ_s dY·x̂,  gβ_b[c] = Σ_s dY
//   norms[b] = ‖gγ_b‖² + ‖gβ_b‖²           (each term as the flags ask)
//
// x̂ = (x − mean)·rstd, statistics per row (group) recomputed from x; the
// formulas are the GN_HD helpers of norm_layers_math.h, which the CPU kernels
// (and so the CPU tests) share.
//
// LayerNorm: (1) one warp per row computes mean and rstd, two passes over the
// row; (2) a block per (sample, chunk of rows, 256 columns), one thread per
// column, sums dY ⊙ x̂ and dY down the chunk's rows into a workspace slot;
// (3) a block per sample adds the chunks in order, squares and sums.
// GroupNorm: (1) a block per (sample, group) computes its statistics; (2) a
// warp per channel reduces over S and writes the channel's term; (3) a block
// per sample adds the terms.
// Launch shapes depend on the problem shape only and every sum runs in a
// fixed order, so results are bitwise reproducible. Accumulation is in float
// (double for double inputs); half and bfloat16 are converted on load.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"
#include "cuda/device_common.cuh"
#include "cuda/norm_layers_launchers.h"
#include "norm_layers_math.h"

namespace gradnoise {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Launch-shape policy: constants, not device queries (reproducibility).
constexpr int64_t kTargetBlocks = 256;  // ~2 waves on 108-132 SM parts
constexpr int64_t kMaxGrid = 1 << 20;   // grid-stride beyond this
constexpr int64_t kMinRowsPerChunk = 16;
constexpr size_t kWorkspaceAlign = 256;


// Butterfly: every lane ends with the same sum, added in the same order.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block (every thread calls it); the total goes to every thread.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  A total = A(0);
#pragma unroll
  for (int w = 0; w < kWarpsPerBlock; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused at once
  return total;
}

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

size_t align_up(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

size_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// ---------------------------------------------------------------------------
// LayerNorm / RMSNorm
// ---------------------------------------------------------------------------

// mean and rstd of rows [0, R) of x [R, C], one warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, acc_t<scalar_t> eps,
                     bool rms, acc_t<scalar_t>* __restrict__ mean, acc_t<scalar_t>* __restrict__ rstd) {
  using A = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < R;
       r += stride) {
    const scalar_t* row = x + r * C;
    A m = A(0);
    if (!rms) {
      A s = A(0);
      for (int64_t c = lane; c < C; c += kWarp) s += to_acc(row[c]);
      m = norm_mean(warp_sum(s), C);
    }
    A q = A(0);
    for (int64_t c = lane; c < C; c += kWarp) {
      const A d = to_acc(row[c]) - m;
      q += d * d;
    }
    q = warp_sum(q);
    if (lane == 0) {
      mean[r] = m;
      rstd[r] = norm_rstd(q, C, eps);
    }
  }
}

struct LayerNormPlan {
  int64_t R, col_blocks, chunks, rows_per_chunk, width;
  size_t stats_bytes, part_bytes, bytes;
};

LayerNormPlan plan_layer_norm(int64_t B, int64_t T, int64_t C, DType dtype, bool with_weight,
                              bool with_bias) {
  LayerNormPlan pl{};
  pl.R = B * T;
  pl.col_blocks = ceil_div(C, kThreads);
  pl.width = (with_weight ? C : 0) + (with_bias ? C : 0);
  const int64_t want = ceil_div(kTargetBlocks, B * pl.col_blocks > 0 ? B * pl.col_blocks : 1);
  const int64_t most = T > 0 ? ceil_div(T, kMinRowsPerChunk) : 1;
  const int64_t chunks = want < 1 ? 1 : (want > most ? most : want);
  pl.rows_per_chunk = T > 0 ? ceil_div(T, chunks) : 1;
  pl.chunks = T > 0 ? ceil_div(T, pl.rows_per_chunk) : 0;
  const size_t a = acc_bytes(dtype);
  pl.stats_bytes = with_weight ? align_up(2 * static_cast<size_t>(pl.R) * a) : 0;
  pl.part_bytes = align_up(static_cast<size_t>(B * pl.chunks * pl.width) * a);
  pl.bytes = pl.stats_bytes + pl.part_bytes;
  return pl;
}

// Block (item = b·chunks + k, column block): thread c sums rows [t0, t1) of
// chunk k of sample b into part[item, :] = [gγ (kW) | gβ (kB)].
template <typename scalar_t, bool kW, bool kB>
__global__ void __launch_bounds__(kThreads)
    layer_norm_grads_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                            const acc_t<scalar_t>* __restrict__ mean,
                            const acc_t<scalar_t>* __restrict__ rstd, int64_t T, int64_t C,
                            int64_t items, int64_t col_blocks, int64_t chunks,
                            int64_t rows_per_chunk, int64_t width,
                            acc_t<scalar_t>* __restrict__ part) {
  using A = acc_t<scalar_t>;
  for (int64_t tile = blockIdx.x; tile < items * col_blocks; tile += gridDim.x) {
    const int64_t item = tile / col_blocks;
    const int64_t c = (tile % col_blocks) * kThreads + threadIdx.x;
    if (c >= C) continue;
    const int64_t b = item / chunks, t0 = (item % chunks) * rows_per_chunk;
    const int64_t t1 = t0 + rows_per_chunk < T ? t0 + rows_per_chunk : T;
    A sg = A(0), sb = A(0);
#pragma unroll 4
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = b * T + t;
      const A dy = to_acc(g[r * C + c]);
      if (kB) sb += dy;
      if (kW) sg += dy * norm_xhat(to_acc(x[r * C + c]), mean[r], rstd[r]);
    }
    A* out = part + item * width;
    if (kW) out[c] = sg;
    if (kB) out[(kW ? C : 0) + c] = sb;
  }
}

// Block per sample: norms[b] = Σ_c affine_sq_norm(Σ_k part[b·chunks + k, c]).
template <typename A, bool kW, bool kB>
__global__ void __launch_bounds__(kThreads)
    layer_norm_finish_kernel(const A* __restrict__ part, int64_t B, int64_t C, int64_t chunks,
                             int64_t width, A* __restrict__ norms) {
  __shared__ A scratch[kWarpsPerBlock];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    A acc = A(0);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      A sg = A(0), sb = A(0);
      for (int64_t k = 0; k < chunks; ++k) {
        const A* p = part + (b * chunks + k) * width;
        if (kW) sg += p[c];
        if (kB) sb += p[(kW ? C : 0) + c];
      }
      acc += affine_sq_norm(sg, sb, kW, kB);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) norms[b] = acc;
  }
}

template <typename scalar_t, bool kW, bool kB>
cudaError_t run_layer_norm_flags(const LayerNormPlan& pl, const scalar_t* x, const scalar_t* g,
                                 acc_t<scalar_t>* norms, unsigned char* ws, int64_t B, int64_t T,
                                 int64_t C, acc_t<scalar_t> eps, bool rms, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  A* mean = nullptr;
  A* rstd = nullptr;
  if (kW) {
    mean = reinterpret_cast<A*>(ws);
    rstd = mean + pl.R;
    row_stats_kernel<scalar_t><<<grid_size(ceil_div(pl.R, kWarpsPerBlock)), kThreads, 0, stream>>>(
        x, pl.R, C, eps, rms, mean, rstd);
    GN_CUDA_TRY(cudaGetLastError());
  }
  A* part = reinterpret_cast<A*>(ws + pl.stats_bytes);
  const int64_t items = B * pl.chunks;
  layer_norm_grads_kernel<scalar_t, kW, kB>
      <<<grid_size(items * pl.col_blocks), kThreads, 0, stream>>>(
          x, g, mean, rstd, T, C, items, pl.col_blocks, pl.chunks, pl.rows_per_chunk, pl.width,
          part);
  GN_CUDA_TRY(cudaGetLastError());
  layer_norm_finish_kernel<A, kW, kB><<<grid_size(B), kThreads, 0, stream>>>(
      part, B, C, pl.chunks, pl.width, norms);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t run_layer_norm(const LayerNormPlan& pl, const void* x, const void* g, void* norms,
                           unsigned char* ws, int64_t B, int64_t T, int64_t C, double eps,
                           bool rms, bool with_weight, bool with_bias, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  const auto* xp = static_cast<const scalar_t*>(x);
  const auto* gp = static_cast<const scalar_t*>(g);
  auto* np = static_cast<A*>(norms);
  const A e = static_cast<A>(eps);
  return dispatch_affine_flags(with_weight, with_bias, [&](auto w, auto b) {
    return run_layer_norm_flags<scalar_t, decltype(w)::value, decltype(b)::value>(
        pl, xp, gp, np, ws, B, T, C, e, rms, stream);
  });
}

// ---------------------------------------------------------------------------
// GroupNorm
// ---------------------------------------------------------------------------

// Block per group bg: mean and rstd of the n values x[bg·n, (bg + 1)·n).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    group_stats_kernel(const scalar_t* __restrict__ x, int64_t BG, int64_t n, acc_t<scalar_t> eps,
                       acc_t<scalar_t>* __restrict__ mean, acc_t<scalar_t>* __restrict__ rstd) {
  using A = acc_t<scalar_t>;
  __shared__ A scratch[kWarpsPerBlock];
  for (int64_t bg = blockIdx.x; bg < BG; bg += gridDim.x) {
    const scalar_t* p = x + bg * n;
    A s = A(0);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) s += to_acc(p[j]);
    const A m = norm_mean(block_sum(s, scratch), n);
    A q = A(0);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const A d = to_acc(p[j]) - m;
      q += d * d;
    }
    q = block_sum(q, scratch);
    if (threadIdx.x == 0) {
      mean[bg] = m;
      rstd[bg] = norm_rstd(q, n, eps);
    }
  }
}

// Warp per channel bc = b·C + c: term[bc] = affine_sq_norm(rstd·Σ_s dY·(x − mean), Σ_s dY).
template <typename scalar_t, bool kW, bool kB>
__global__ void __launch_bounds__(kThreads)
    group_norm_channels_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                               const acc_t<scalar_t>* __restrict__ mean,
                               const acc_t<scalar_t>* __restrict__ rstd, int64_t BC, int64_t C,
                               int64_t S, int64_t G, int64_t cpg,
                               acc_t<scalar_t>* __restrict__ term) {
  using A = acc_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t bc = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       bc < BC; bc += stride) {
    const int64_t bg = (bc / C) * G + (bc % C) / cpg;
    const A m = kW ? mean[bg] : A(0);
    A dot = A(0), sum = A(0);
    for (int64_t s = lane; s < S; s += kWarp) {
      const A dy = to_acc(g[bc * S + s]);
      if (kB) sum += dy;
      if (kW) dot += dy * (to_acc(x[bc * S + s]) - m);
    }
    if (kW) dot = warp_sum(dot);
    if (kB) sum = warp_sum(sum);
    if (lane == 0) term[bc] = affine_sq_norm(kW ? rstd[bg] * dot : A(0), sum, kW, kB);
  }
}

// Block per sample: norms[b] = Σ_c term[b·C + c].
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_rows_kernel(const A* __restrict__ term, int64_t B, int64_t C, A* __restrict__ norms) {
  __shared__ A scratch[kWarpsPerBlock];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    A acc = A(0);
    for (int64_t c = threadIdx.x; c < C; c += kThreads) acc += term[b * C + c];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) norms[b] = acc;
  }
}

struct GroupNormPlan {
  size_t stats_bytes, term_bytes, bytes;
};

GroupNormPlan plan_group_norm(int64_t B, int64_t C, int64_t groups, DType dtype, bool with_weight) {
  const size_t a = acc_bytes(dtype);
  GroupNormPlan pl{};
  pl.stats_bytes = with_weight ? align_up(2 * static_cast<size_t>(B * groups) * a) : 0;
  pl.term_bytes = align_up(static_cast<size_t>(B * C) * a);
  pl.bytes = pl.stats_bytes + pl.term_bytes;
  return pl;
}

template <typename scalar_t, bool kW, bool kB>
cudaError_t run_group_norm_flags(const GroupNormPlan& pl, const scalar_t* x, const scalar_t* g,
                                 acc_t<scalar_t>* norms, unsigned char* ws, int64_t B, int64_t C,
                                 int64_t S, int64_t G, acc_t<scalar_t> eps, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  A* mean = nullptr;
  A* rstd = nullptr;
  if (kW) {
    mean = reinterpret_cast<A*>(ws);
    rstd = mean + B * G;
    group_stats_kernel<scalar_t><<<grid_size(B * G), kThreads, 0, stream>>>(
        x, B * G, (C / G) * S, eps, mean, rstd);
    GN_CUDA_TRY(cudaGetLastError());
  }
  A* term = reinterpret_cast<A*>(ws + pl.stats_bytes);
  group_norm_channels_kernel<scalar_t, kW, kB>
      <<<grid_size(ceil_div(B * C, kWarpsPerBlock)), kThreads, 0, stream>>>(
          x, g, mean, rstd, B * C, C, S, G, C / G, term);
  GN_CUDA_TRY(cudaGetLastError());
  sum_rows_kernel<A><<<grid_size(B), kThreads, 0, stream>>>(term, B, C, norms);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t run_group_norm(const GroupNormPlan& pl, const void* x, const void* g, void* norms,
                           unsigned char* ws, int64_t B, int64_t C, int64_t S, int64_t G,
                           double eps, bool with_weight, bool with_bias, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  const auto* xp = static_cast<const scalar_t*>(x);
  const auto* gp = static_cast<const scalar_t*>(g);
  auto* np = static_cast<A*>(norms);
  const A e = static_cast<A>(eps);
  return dispatch_affine_flags(with_weight, with_bias, [&](auto w, auto b) {
    return run_group_norm_flags<scalar_t, decltype(w)::value, decltype(b)::value>(
        pl, xp, gp, np, ws, B, C, S, G, e, stream);
  });
}

}  // namespace

size_t layer_norm_sq_norms_workspace_bytes(int64_t B, int64_t T, int64_t C, DType dtype,
                                           bool with_weight, bool with_bias) {
  if (B <= 0 || T <= 0 || C <= 0 || !(with_weight || with_bias)) return 0;
  return plan_layer_norm(B, T, C, dtype, with_weight, with_bias).bytes;
}

cudaError_t launch_layer_norm_sq_norms(const void* x, const void* grad_out, void* norms,
                                       void* workspace, size_t workspace_bytes, int64_t B,
                                       int64_t T, int64_t C, double eps, bool rms,
                                       bool with_weight, bool with_bias, DType dtype,
                                       cudaStream_t stream) {
  if (B < 0 || T < 0 || C < 0 || !(eps >= 0.0)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (T == 0 || C == 0 || !(with_weight || with_bias))
    return cudaMemsetAsync(norms, 0, static_cast<size_t>(B) * acc_bytes(dtype), stream);
  const LayerNormPlan pl = plan_layer_norm(B, T, C, dtype, with_weight, with_bias);
  if (workspace_bytes < pl.bytes || workspace == nullptr) return cudaErrorInvalidValue;
  auto* ws = static_cast<unsigned char*>(workspace);
  return dispatch_dtype(dtype, [&](auto tag) {
    return run_layer_norm<decltype(tag)>(pl, x, grad_out, norms, ws, B, T, C, eps, rms,
                                         with_weight, with_bias, stream);
  });
}

size_t group_norm_sq_norms_workspace_bytes(int64_t B, int64_t C, int64_t S, int64_t groups,
                                           DType dtype, bool with_weight, bool with_bias) {
  if (B <= 0 || C <= 0 || S <= 0 || groups <= 0 || !(with_weight || with_bias)) return 0;
  return plan_group_norm(B, C, groups, dtype, with_weight).bytes;
}

cudaError_t launch_group_norm_sq_norms(const void* x, const void* grad_out, void* norms,
                                       void* workspace, size_t workspace_bytes, int64_t B,
                                       int64_t C, int64_t S, int64_t groups, double eps,
                                       bool with_weight, bool with_bias, DType dtype,
                                       cudaStream_t stream) {
  if (B < 0 || C < 0 || S < 0 || groups < 1 || C % groups != 0 || !(eps >= 0.0))
    return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (C == 0 || S == 0 || !(with_weight || with_bias))
    return cudaMemsetAsync(norms, 0, static_cast<size_t>(B) * acc_bytes(dtype), stream);
  const GroupNormPlan pl = plan_group_norm(B, C, groups, dtype, with_weight);
  if (workspace_bytes < pl.bytes || workspace == nullptr) return cudaErrorInvalidValue;
  auto* ws = static_cast<unsigned char*>(workspace);
  return dispatch_dtype(dtype, [&](auto tag) {
    return run_group_norm<decltype(tag)>(pl, x, grad_out, norms, ws, B, C, S, groups, eps,
                                         with_weight, with_bias, stream);
  });
}

}  // namespace cuda
}  // namespace gradnoise
