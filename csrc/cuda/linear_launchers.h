// Host launchers of the CUDA Linear kernels (linear_kernels.cu).
//
// Plain C++ over the CUDA runtime API, so that both the .cu file and the torch
// binding (linear_binding.cpp, compiled by the host compiler) include it.
// Launchers take raw device pointers to contiguous tensors, the sizes of the
// problem (x [B, T, d], grad_out [B, T, p], T = product of the middle dims),
// a caller-allocated scratch buffer and a stream; they only enqueue work
// (no allocation, no synchronisation) and return the first launch error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace gradnoise {
namespace cuda {

// Element type of x, grad_out and the gradients. Norms (and the scratch
// buffer's partial sums) are float, or double for kFloat64.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
};

// A method as the user asks for it; kAuto is resolved by the cost model.
enum class MethodRequest : int32_t {
  kAuto = -1,
  kGoodfellow = static_cast<int32_t>(NormMethod::kGoodfellow),
  kGhost = static_cast<int32_t>(NormMethod::kGhost),
  kFused = static_cast<int32_t>(NormMethod::kFused),
};

// kAuto -> choose_linear_norm_method (common.h), decided on every call since
// B and T change between steps. The caller must reject kGoodfellow with T != 1.
inline NormMethod resolve_linear_method(MethodRequest request, int64_t B,
                                        int64_t T, int64_t d, int64_t p,
                                        bool with_weight_grad) {
  if (request == MethodRequest::kAuto)
    return choose_linear_norm_method(B, T, d, p, with_weight_grad);
  return static_cast<NormMethod>(static_cast<int32_t>(request));
}

// Bytes of scratch memory the launcher below needs for this call (0 is
// possible). Depends only on the arguments, never on the device.
size_t linear_sq_norms_workspace_bytes(int64_t B, int64_t T, int64_t d,
                                       int64_t p, DType dtype, bool with_bias,
                                       NormMethod method);

// norms[i] = ‖dY_iᵀX_i‖²_F (+ ‖Σ_t dY_i,t‖² if with_bias), i < B, written as
// float (double for kFloat64). Returns cudaErrorInvalidValue for goodfellow
// with T != 1 or a workspace smaller than linear_sq_norms_workspace_bytes.
cudaError_t launch_linear_sq_norms(const void* x, const void* grad_out,
                                   void* norms, void* workspace,
                                   size_t workspace_bytes, int64_t B,
                                   int64_t T, int64_t d, int64_t p,
                                   DType dtype, bool with_bias,
                                   NormMethod method, cudaStream_t stream);

size_t linear_weight_grad_and_sq_norms_workspace_bytes(
    int64_t B, int64_t T, int64_t d, int64_t p, DType dtype, bool with_bias,
    NormMethod method);

// As launch_linear_sq_norms, and also grad_weight [p, d] = Σ_i dY_iᵀX_i and,
// if with_bias, grad_bias [p] = Σ_i,t dY_i,t (grad_bias may be null
// otherwise), both in `dtype`, accumulated in float (double). With method
// kFused one kernel produces the weight gradient and the norms together.
cudaError_t launch_linear_weight_grad_and_sq_norms(
    const void* x, const void* grad_out, void* grad_weight, void* grad_bias,
    void* norms, void* workspace, size_t workspace_bytes, int64_t B,
    int64_t T, int64_t d, int64_t p, DType dtype, bool with_bias,
    NormMethod method, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradnoise
