// Maths shared by the CPU, CUDA and (through its Python twin) Triton paths.
//
// Everything here is __host__ __device__ so that the CPU build, which the test
// suite runs, exercises the same code the CUDA kernels use.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GN_HD __host__ __device__ __forceinline__
#else
#define GN_HD inline
#endif

namespace gradnoise {

// Per-sample squared-norm methods for a Linear layer with input X_i [T, d] and
// output gradient dY_i [T, p]; G_i = dY_iᵀ X_i.
enum class NormMethod : int32_t {
  kGoodfellow = 0,  // T = 1: ‖G_i‖² = ‖x_i‖²‖dy_i‖² (Goodfellow 2015)
  kGhost = 1,       // ‖G_i‖² = ⟨X_i X_iᵀ, dY_i dY_iᵀ⟩_F (Li et al. 2021)
  kFused = 2,       // G_i formed tile by tile inside the weight-gradient GEMM
};

// Cost of each method in floating-point operations, counting one memory pass
// over an element as one operation. `with_weight_grad` means the caller also
// needs Σ_i G_i, which costs 2BTdp whichever method gives the norms; the
// numbers below are what a method adds to that.
struct LinearCost {
  double goodfellow;
  double ghost;
  double fused;
};

// Extra work per weight-gradient element per sample in the fused epilogue:
// load and store the accumulator, one add, one fma for the square.
constexpr double kFusedEpilogueOpsPerElement = 4.0;

GN_HD LinearCost linear_norm_costs(int64_t B, int64_t T, int64_t d, int64_t p,
                                   bool with_weight_grad) {
  const double b = static_cast<double>(B), t = static_cast<double>(T);
  const double dd = static_cast<double>(d), pp = static_cast<double>(p);
  LinearCost c;
  c.goodfellow = T == 1 ? 2.0 * b * (dd + pp) : 1e300;
  // Two T×T Gram matrices per sample (2T²(d+p)) plus writing and reading them.
  c.ghost = b * (2.0 * t * t * (dd + pp) + 4.0 * t * t);
  // Norms alone: the per-sample GEMM is the whole cost. With the weight
  // gradient: the GEMM is paid anyway, only the epilogue is extra.
  c.fused = with_weight_grad ? kFusedEpilogueOpsPerElement * b * dd * pp
                             : 2.0 * b * t * dd * pp;
  return c;
}

// The cheapest method for this call's shape (chosen on every call: T and B
// change between steps).
GN_HD NormMethod choose_linear_norm_method(int64_t B, int64_t T, int64_t d,
                                           int64_t p, bool with_weight_grad) {
  if (T == 1) return NormMethod::kGoodfellow;
  const LinearCost c = linear_norm_costs(B, T, d, p, with_weight_grad);
  return c.ghost < c.fused ? NormMethod::kGhost : NormMethod::kFused;
}

// Number of chunks the T reduction of one sample is split into so that each
// chunk is at most `max_chunk` long and the chunks are of equal length.
GN_HD int64_t num_reduction_chunks(int64_t T, int64_t max_chunk) {
  return T <= max_chunk ? 1 : (T + max_chunk - 1) / max_chunk;
}

GN_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gradnoise
