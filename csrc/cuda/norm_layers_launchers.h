// Host launchers of the CUDA normalisation-layer kernels (norm_layers.cu).
//
// Plain C++ over the CUDA runtime API, included by the .cu file and by the
// torch binding (norm_layers_binding.cpp). Launchers take raw device pointers
// to contiguous tensors, the problem's sizes, a caller-allocated workspace
// and a stream; they only enqueue work (no allocation, no synchronisation)
// and return the first launch error. Norms are float, or double for kFloat64;
// all B of them are written, zeros included.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/linear_launchers.h"  // DType

namespace gradnoise {
namespace cuda {

// LayerNorm / RMSNorm: x, grad_out [B, T, C] (C = normalized_numel).
size_t layer_norm_sq_norms_workspace_bytes(int64_t B, int64_t T, int64_t C, DType dtype,
                                           bool with_weight, bool with_bias);

// norms[b] = ‖Σ_t dY_b,t ⊙ x̂_b,t‖² (with_weight) + ‖Σ_t dY_b,t‖² (with_bias),
// x̂ = (x − mean)·rstd per row (rms: x·rstd). cudaErrorInvalidValue for a
// workspace smaller than layer_norm_sq_norms_workspace_bytes or negative sizes.
cudaError_t launch_layer_norm_sq_norms(const void* x, const void* grad_out, void* norms,
                                       void* workspace, size_t workspace_bytes, int64_t B,
                                       int64_t T, int64_t C, double eps, bool rms,
                                       bool with_weight, bool with_bias, DType dtype,
                                       cudaStream_t stream);

// GroupNorm: x, grad_out [B, C, S], `groups` dividing C.
size_t group_norm_sq_norms_workspace_bytes(int64_t B, int64_t C, int64_t S, int64_t groups,
                                           DType dtype, bool with_weight, bool with_bias);

// norms[b] = Σ_c (Σ_s dY·x̂)² (with_weight) + (Σ_s dY)² (with_bias), with
// statistics per (b, group) over (C/groups)·S values.
cudaError_t launch_group_norm_sq_norms(const void* x, const void* grad_out, void* norms,
                                       void* workspace, size_t workspace_bytes, int64_t B,
                                       int64_t C, int64_t S, int64_t groups, double eps,
                                       bool with_weight, bool with_bias, DType dtype,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace gradnoise
