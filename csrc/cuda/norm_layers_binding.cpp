// CUDA implementations of the normalisation-layer ops whose schemas are in
// ../registration.cpp: argument checks and allocation here, kernels in
// norm_layers.cu behind the raw-pointer launchers of norm_layers_launchers.h.
//
// Part of gradnoise._C_cuda (linear_binding.cpp defines its PyInit); built
// only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "cuda/binding_dtype.h"
#include "norm_layers_checks.h"
#include "cuda/norm_layers_launchers.h"

namespace gradnoise {
namespace {


at::ScalarType norm_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "gradnoise: CUDA ", op, " failed: ",
              cudaGetErrorString(status));
}

at::Tensor layer_norm_sq_norms_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                    int64_t normalized_numel, double eps, bool rms,
                                    bool with_weight, bool with_bias) {
  const auto [B, T, C] =
      layer_norm_shape(x, grad_out, normalized_numel, eps, at::kCUDA, "CUDA");

  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_out.contiguous();
  const cuda::DType dtype = launcher_dtype(x.scalar_type());
  at::Tensor norms = at::empty({B}, x.options().dtype(norm_dtype(x.scalar_type())));
  const size_t ws_bytes =
      cuda::layer_norm_sq_norms_workspace_bytes(B, T, C, dtype, with_weight, with_bias);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_layer_norm_sq_norms(
                   xc.data_ptr(), gc.data_ptr(), norms.data_ptr(),
                   ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes, B, T, C, eps, rms,
                   with_weight, with_bias, dtype, stream),
               "layer_norm_sq_norms");
  return norms;
}

at::Tensor group_norm_sq_norms_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                    int64_t groups, double eps, bool with_weight,
                                    bool with_bias) {
  const auto [B, C, S] = group_norm_shape(x, grad_out, groups, eps, at::kCUDA, "CUDA");

  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_out.contiguous();
  const cuda::DType dtype = launcher_dtype(x.scalar_type());
  at::Tensor norms = at::empty({B}, x.options().dtype(norm_dtype(x.scalar_type())));
  const size_t ws_bytes =
      cuda::group_norm_sq_norms_workspace_bytes(B, C, S, groups, dtype, with_weight, with_bias);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_group_norm_sq_norms(
                   xc.data_ptr(), gc.data_ptr(), norms.data_ptr(),
                   ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes, B, C, S, groups,
                   eps, with_weight, with_bias, dtype, stream),
               "group_norm_sq_norms");
  return norms;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CUDA, m) {
  m.impl("layer_norm_sq_norms", &layer_norm_sq_norms_cuda);
  m.impl("group_norm_sq_norms", &group_norm_sq_norms_cuda);
}

}  // namespace gradnoise
