// What every gradnoise CUDA kernel file shares: the accumulation types
// (float for float/half/bfloat16 inputs, double for double, the same rule as
// the CPU kernels), warp constants, and the launcher error macro.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

}  // namespace cuda
}  // namespace gradnoise
