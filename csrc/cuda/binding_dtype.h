// The launchers' dtype tag of a torch scalar type (torch-facing bindings only).
#pragma once

#include <ATen/ATen.h>

#include "cuda/linear_launchers.h"

namespace gradnoise {

inline cuda::DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "gradnoise: unsupported dtype ", t);
  }
}

}  // namespace gradnoise
