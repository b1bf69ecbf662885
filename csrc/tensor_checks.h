// What every op's torch-facing code shares (the CPU kernels' entry points and
// the CUDA bindings; not for .cu files): the accumulation type and the check
// of an (input, output gradient) pair. The messages are those of
// gradnoise/ops/_validate.py.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <utility>

namespace gradnoise {

// Sums accumulate in float32, or float64 for float64 input.
template <typename S>
using acc_of = std::conditional_t<std::is_same_v<S, double>, double, float>;

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `x` and `grad_out`: on `device`, a supported dtype (the same), at least 2-D.
inline void check_tensor_pair(const at::Tensor& x, const at::Tensor& g, const char* layout,
                              at::DeviceType device, const char* backend) {
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"x", x}, {"grad_out", g}}) {
    TORCH_CHECK(t.device().type() == device, "gradnoise: `", name, "` must be a ", backend,
                " tensor for the ", backend, " kernels, got one on ", t.device());
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
}

}  // namespace gradnoise
