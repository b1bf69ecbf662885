// Maths of the normalisation-layer per-sample-norm ops, shared by the CPU
// kernels (cpu/norm_layers_cpu.cpp) and the CUDA kernels (cuda/norm_layers.cu).
//
// LayerNorm / RMSNorm over rows of C entries, GroupNorm over groups of
// (C/G)·S entries (Gray et al. 2024, "Normalization Layer Per-Example
// Gradients are Sufficient to Predict Gradient Noise Scale in Transformers"):
//     x̂ = (x − mean)·rstd   (RMSNorm: x̂ = x·rstd),  rstd = 1/√(σ² + ε)
//     gγ_i = Σ dY ⊙ x̂,   gβ_i = Σ dY   (over sample i's rows / spatial points)
//     n_i  = ‖gγ_i‖² + ‖gβ_i‖²
// σ² is the biased variance Σ(x − mean)²/n (RMSNorm: Σx²/n), as in torch.
// The CPU tests run these functions; CUDA code runs nowhere here.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace gradnoise {

// A LayerNorm sample's rows are reduced in chunks of this many rows: each
// chunk's γ/β gradients are summed on their own and then added, in chunk
// order, to the sample's. The chunks are the unit of parallel work when there
// are fewer samples than threads, and because their size is fixed the result
// does not depend on the number of threads.
constexpr int64_t kNormRowsPerChunk = 64;

// Same for GroupNorm's long sums (a group's statistics over (C/G)·S entries,
// a channel's γ/β gradient over S points): partial sums of this many
// consecutive entries, added in order.
constexpr int64_t kNormElemsPerChunk = 4096;

GN_HD int64_t norm_num_chunks(int64_t n, int64_t chunk) {
  return n <= 0 ? 0 : ceil_div(n, chunk);
}

template <typename A>
GN_HD A norm_mean(A sum, int64_t n) {
  return n > 0 ? sum / static_cast<A>(n) : A(0);
}

// rstd = 1/√(m2/n + ε): m2 = Σ(x − mean)² gives LayerNorm's and GroupNorm's
// biased variance, m2 = Σx² RMSNorm's mean square.
template <typename A>
GN_HD A norm_rstd(A m2, int64_t n, A eps) {
  const A var = n > 0 ? m2 / static_cast<A>(n) : A(0);
  return A(1) / std::sqrt(var + eps);
}

// x̂ as torch computes it: the difference first, so that it stays exact-ish
// when |mean| ≫ σ (a fused a·x + b would not).
template <typename A>
GN_HD A norm_xhat(A x, A mean, A rstd) {
  return (x - mean) * rstd;
}

// One channel's (or one sample's) term of the norm, as the flags ask.
template <typename A>
GN_HD A affine_sq_norm(A g_gamma, A g_beta, bool with_weight, bool with_bias) {
  return (with_weight ? g_gamma * g_gamma : A(0)) + (with_bias ? g_beta * g_beta : A(0));
}

}  // namespace gradnoise
