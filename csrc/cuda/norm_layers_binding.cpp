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
#include "cuda/norm_layers_launchers.h"

namespace gradnoise {
namespace {


// The same checks, in the same words, as cpu/norm_layers_cpu.cpp and
// gradnoise/ops/norm_layers.py.
void check_pair(const at::Tensor& x, const at::Tensor& g, const char* layout) {
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"x", x}, {"grad_out", g}}) {
    TORCH_CHECK(t.is_cuda(), "gradnoise: `", name,
                "` must be a CUDA tensor for the CUDA kernels, got one on ", t.device());
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                "gradnoise: `", name, "` has dtype ", st,
                "; supported dtypes are float32, float64, bfloat16 and float16");
    TORCH_CHECK(t.dim() >= 2, "gradnoise: `", name, "` must have at least 2 dimensions ", layout,
                ", got ", t.sizes());
  }
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), "gradnoise: `x` is ", x.scalar_type(),
              " but `grad_out` is ", g.scalar_type());
  TORCH_CHECK(x.device() == g.device(), "gradnoise: `x` is on ", x.device(),
              " but `grad_out` is on ", g.device());
  TORCH_CHECK(x.sizes() == g.sizes(), "gradnoise: `x` of shape ", x.sizes(),
              " and `grad_out` of shape ", g.sizes(), " must have the same shape");
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0,
              "gradnoise: `eps` must be a finite number >= 0, got ", eps);
}

at::ScalarType norm_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "gradnoise: CUDA ", op, " failed: ",
              cudaGetErrorString(status));
}

at::Tensor layer_norm_sq_norms_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                    int64_t normalized_numel, double eps, bool rms,
                                    bool with_weight, bool with_bias) {
  check_pair(x, grad_out, "[B, ..., normalized dims]");
  check_eps(eps);
  TORCH_CHECK(normalized_numel >= 1, "gradnoise: `normalized_numel` must be >= 1, got ",
              normalized_numel);
  int64_t trailing = 1;
  bool matches = false;
  for (int64_t k = x.dim() - 1; k >= 1 && !matches; --k) {
    trailing *= x.size(k);
    matches = trailing == normalized_numel;
  }
  TORCH_CHECK(matches, "gradnoise: `normalized_numel` = ", normalized_numel,
              " is not the product of trailing dimensions of `x` of shape ", x.sizes(),
              " (the first dimension is the batch)");
  const int64_t B = x.size(0), C = normalized_numel;
  const int64_t T = B == 0 ? 0 : x.numel() / (B * C);

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
  check_pair(x, grad_out, "[B, C, *spatial]");
  check_eps(eps);
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0, "gradnoise: `groups` = ", groups,
              " must be >= 1 and divide the ", C, " channels of `x` (dimension 1 of ",
              x.sizes(), ")");
  const int64_t S = B * C == 0 ? 0 : x.numel() / (B * C);

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
