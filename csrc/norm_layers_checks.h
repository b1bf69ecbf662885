// Argument checks and problem sizes of the norm-layer ops, shared by the CPU
// kernels and the CUDA binding (torch-facing code only: not for .cu files).
// The messages are those of gradnoise/ops/norm_layers.py.
#pragma once

#include <ATen/ATen.h>

#include "tensor_checks.h"

#include <cmath>
#include <cstdint>
#include <utility>

namespace gradnoise {

inline void check_norm_pair(const at::Tensor& x, const at::Tensor& g, const char* layout,
                            at::DeviceType device, const char* backend) {
  check_tensor_pair(x, g, layout, device, backend);
  TORCH_CHECK(x.sizes() == g.sizes(), "gradnoise: `x` of shape ", x.sizes(),
              " and `grad_out` of shape ", g.sizes(), " must have the same shape");
}

inline void check_norm_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0,
              "gradnoise: `eps` must be a finite number >= 0, got ", eps);
}

struct LayerNormShape {
  int64_t B, T, C;  // samples, rows per sample, normalised entries per row
};

// x viewed as [B, T, C], C = normalized_numel = a product of trailing dims.
inline LayerNormShape layer_norm_shape(const at::Tensor& x, const at::Tensor& g,
                                       int64_t normalized_numel, double eps,
                                       at::DeviceType device, const char* backend) {
  check_norm_pair(x, g, "[B, ..., normalized dims]", device, backend);
  check_norm_eps(eps);
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
  return {B, B == 0 ? 0 : x.numel() / (B * C), C};
}

struct GroupNormShape {
  int64_t B, C, S;  // samples, channels, spatial positions
};

// x viewed as [B, C, S]; `groups` divides C.
inline GroupNormShape group_norm_shape(const at::Tensor& x, const at::Tensor& g, int64_t groups,
                                       double eps, at::DeviceType device, const char* backend) {
  check_norm_pair(x, g, "[B, C, *spatial]", device, backend);
  check_norm_eps(eps);
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0, "gradnoise: `groups` = ", groups,
              " must be >= 1 and divide the ", C, " channels of `x` (dimension 1 of ",
              x.sizes(), ")");
  return {B, C, B * C == 0 ? 0 : x.numel() / (B * C)};
}

}  // namespace gradnoise
