// CUDA implementations of the gradnoise Linear ops whose schemas are in
// ../registration.cpp. Checks and allocation happen here; the kernels are in
// linear_kernels.cu behind the raw-pointer launchers of linear_launchers.h.
//
// Built only as gradnoise._C_cuda (setup.py, when torch has CUDA); the
// dispatcher routes CUDA tensors here once gradnoise._C has defined the ops.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common.h"
#include "cuda/binding_dtype.h"
#include "cuda/linear_launchers.h"

namespace gradnoise {
namespace {

struct LinearShape {
  int64_t B, T, d, p;
};


void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "gradnoise: `", name,
              "` must be a CUDA tensor for the CUDA kernels, got one on ",
              t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf ||
                  dt == at::kBFloat16,
              "gradnoise: `", name, "` has dtype ", dt,
              "; supported dtypes are float32, float64, bfloat16 and float16");
  TORCH_CHECK(t.dim() >= 2, "gradnoise: `", name,
              "` must have at least 2 dimensions [B, ..., features], got "
              "shape ",
              t.sizes());
}

// The same checks, in the same words, as gradnoise/ops/_validate.py.
LinearShape check_linear(const at::Tensor& x, const at::Tensor& grad_out) {
  check_tensor(x, "x");
  check_tensor(grad_out, "grad_out");
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), "gradnoise: `x` is ",
              x.scalar_type(), " but `grad_out` is ", grad_out.scalar_type(),
              "; pass both in the layer's compute dtype");
  TORCH_CHECK(x.device() == grad_out.device(), "gradnoise: `x` is on ",
              x.device(), " but `grad_out` is on ", grad_out.device());
  const int64_t nd = x.dim();
  TORCH_CHECK(grad_out.dim() == nd &&
                  x.sizes().slice(0, nd - 1).equals(
                      grad_out.sizes().slice(0, nd - 1)),
              "gradnoise: `x` of shape ", x.sizes(), " and `grad_out` of shape ",
              grad_out.sizes(),
              " must agree on every dimension but the last ([B, ..., d] and "
              "[B, ..., p])");
  LinearShape s{x.size(0), 1, x.size(nd - 1), grad_out.size(nd - 1)};
  for (int64_t k = 1; k < nd - 1; ++k) s.T *= x.size(k);
  return s;
}

NormMethod resolve_method(c10::string_view method, const at::Tensor& x,
                          const LinearShape& s, bool with_weight_grad) {
  cuda::MethodRequest request;
  if (method == "auto") {
    request = cuda::MethodRequest::kAuto;
  } else if (method == "goodfellow") {
    request = cuda::MethodRequest::kGoodfellow;
  } else if (method == "ghost") {
    request = cuda::MethodRequest::kGhost;
  } else if (method == "fused") {
    request = cuda::MethodRequest::kFused;
  } else {
    TORCH_CHECK(false, "gradnoise: unknown `method` '", method,
                "'; choose one of ('auto', 'goodfellow', 'ghost', 'fused')");
  }
  TORCH_CHECK(request != cuda::MethodRequest::kGoodfellow || s.T == 1,
              "gradnoise: method 'goodfellow' needs one position per sample "
              "(T = 1), but `x` of shape ",
              x.sizes(), " has T = ", s.T,
              "; use 'ghost', 'fused' or 'auto'");
  return cuda::resolve_linear_method(request, s.B, s.T, s.d, s.p,
                                     with_weight_grad);
}

at::ScalarType norm_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "gradnoise: CUDA ", op,
              " failed: ", cudaGetErrorString(status));
}

at::Tensor linear_sq_norms_cuda(const at::Tensor& x, const at::Tensor& grad_out,
                                bool with_bias, c10::string_view method) {
  const LinearShape s = check_linear(x, grad_out);
  const NormMethod m = resolve_method(method, x, s, false);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_out.contiguous();
  const cuda::DType dtype = launcher_dtype(x.scalar_type());

  at::Tensor norms =
      at::empty({s.B}, x.options().dtype(norm_dtype(x.scalar_type())));
  const size_t ws_bytes = cuda::linear_sq_norms_workspace_bytes(
      s.B, s.T, s.d, s.p, dtype, with_bias, m);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)},
                                   x.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_linear_sq_norms(
                   xc.data_ptr(), gc.data_ptr(), norms.data_ptr(),
                   ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes,
                   s.B, s.T, s.d, s.p, dtype, with_bias, m, stream),
               "linear_sq_norms");
  return norms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
linear_weight_grad_and_sq_norms_cuda(const at::Tensor& x,
                                     const at::Tensor& grad_out,
                                     bool with_bias, c10::string_view method) {
  const LinearShape s = check_linear(x, grad_out);
  const NormMethod m = resolve_method(method, x, s, true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_out.contiguous();
  const cuda::DType dtype = launcher_dtype(x.scalar_type());

  at::Tensor grad_weight = at::empty({s.p, s.d}, x.options());
  // The schema returns three tensors; "no bias" is an empty one, which the
  // Python wrapper turns into None.
  at::Tensor grad_bias = at::empty({with_bias ? s.p : 0}, x.options());
  at::Tensor norms =
      at::empty({s.B}, x.options().dtype(norm_dtype(x.scalar_type())));
  const size_t ws_bytes = cuda::linear_weight_grad_and_sq_norms_workspace_bytes(
      s.B, s.T, s.d, s.p, dtype, with_bias, m);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)},
                                   x.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_launch(
      cuda::launch_linear_weight_grad_and_sq_norms(
          xc.data_ptr(), gc.data_ptr(), grad_weight.data_ptr(),
          with_bias ? grad_bias.data_ptr() : nullptr, norms.data_ptr(),
          ws_bytes > 0 ? workspace.data_ptr() : nullptr, ws_bytes, s.B, s.T,
          s.d, s.p, dtype, with_bias, m, stream),
      "linear_weight_grad_and_sq_norms");
  return {grad_weight, grad_bias, norms};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CUDA, m) {
  m.impl("linear_sq_norms", &linear_sq_norms_cuda);
  m.impl("linear_weight_grad_and_sq_norms",
         &linear_weight_grad_and_sq_norms_cuda);
}

}  // namespace gradnoise

// Importing gradnoise._C_cuda loads this library, which registers the CUDA
// kernels above for the ops gradnoise._C defines.
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_cuda", "gradnoise CUDA kernels", -1,
      nullptr, nullptr, nullptr, nullptr, nullptr,
  };
  return PyModule_Create(&module_def);
}
