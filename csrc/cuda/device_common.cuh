// What every gradnoise CUDA kernel file shares: the accumulation types
// (float for float/half/bfloat16 inputs, double for double, the same rule as
// the CPU kernels), warp constants, the launcher error macro, and the
// dispatch from a launcher's run-time arguments to a kernel's template ones.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/linear_launchers.h"

#define GN_CUDA_TRY(expr)                             \
  do {                                                \
    const cudaError_t gn_status_ = (expr);            \
    if (gn_status_ != cudaSuccess) return gn_status_; \
  } while (0)

namespace gradnoise {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// fn(T{}) with T the element type `dtype` names.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// fn(bool_constant<with_weight>, bool_constant<with_bias>), at least one set.
template <typename Fn>
cudaError_t dispatch_affine_flags(bool with_weight, bool with_bias, Fn&& fn) {
  if (with_weight && with_bias) return fn(std::true_type{}, std::true_type{});
  if (with_weight) return fn(std::true_type{}, std::false_type{});
  return fn(std::false_type{}, std::true_type{});
}

}  // namespace cuda
}  // namespace gradnoise
