// The one place where every gradnoise op schema is defined. Device kernels
// register implementations for these schemas in their own files
// (cpu/linear_cpu.cpp, cuda/linear_binding.cpp); the dispatcher picks one by
// the device of the inputs.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common.h"

namespace gradnoise {

int64_t linear_norm_method(int64_t B, int64_t T, int64_t d, int64_t p,
                           bool with_weight_grad) {
  return static_cast<int64_t>(
      choose_linear_norm_method(B, T, d, p, with_weight_grad));
}

std::string cpu_kernel_isa();  // defined in cpu/fused_engine.cpp

std::string build_info() {
  return std::string("cpu_isa=") + cpu_kernel_isa();
}

TORCH_LIBRARY(gradnoise, m) {
  m.def(
      "linear_sq_norms(Tensor x, Tensor grad_out, bool with_bias=False, "
      "str method=\"auto\") -> Tensor");
  m.def(
      "linear_weight_grad_and_sq_norms(Tensor x, Tensor grad_out, "
      "bool with_bias=False, str method=\"auto\") -> (Tensor, Tensor, Tensor)");
  // Convolutions (1-D to 3-D, zero padding, groups): x [B, C, *S],
  // grad_out [B, C_out, *S_out]; the weight gradient has the weight's shape.
  m.def(
      "conv_sq_norms(Tensor x, Tensor grad_out, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool with_bias=False) -> Tensor");
  m.def(
      "conv_weight_grad_and_sq_norms(Tensor x, Tensor grad_out, int[] kernel_size, "
      "int[] stride, int[] padding, int[] dilation, int groups, bool with_bias=False) "
      "-> (Tensor, Tensor, Tensor)");
  // Normalisation layers: per-sample ‖∂ℓ_i/∂γ‖² + ‖∂ℓ_i/∂β‖² from the
  // layer's input and output gradient (x̂ recomputed from x in the same pass).
  m.def(
      "layer_norm_sq_norms(Tensor x, Tensor grad_out, int normalized_numel, float eps, "
      "bool rms, bool with_weight, bool with_bias) -> Tensor");
  m.def(
      "group_norm_sq_norms(Tensor x, Tensor grad_out, int groups, float eps, "
      "bool with_weight, bool with_bias) -> Tensor");
  // LayerNorm's (RMSNorm's, with rms) whole backward with the norms above,
  // the row statistics recomputed from x.
  m.def(
      "layer_norm_backward_and_sq_norms(Tensor x, Tensor grad_out, int normalized_numel, "
      "float eps, bool rms, Tensor? weight, bool need_input_grad, bool with_weight, "
      "bool with_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  // GroupNorm's whole backward (input, γ and β gradients) with the norms
  // above from the same passes; mean and rstd as native_group_norm returns.
  m.def(
      "group_norm_backward_and_sq_norms(Tensor x, Tensor grad_out, Tensor mean, Tensor rstd, "
      "Tensor? weight, int groups, bool need_input_grad, bool with_weight, bool with_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // nn.Embedding: per-sample ‖G_i‖² from the token ids [B, *] and the output
  // gradient [B, *, d]; repeated tokens of a sample add before squaring,
  // padding_idx (-1: none) gets no gradient.
  m.def(
      "embedding_sq_norms(Tensor indices, Tensor grad_out, int num_embeddings, "
      "int padding_idx=-1) -> Tensor");
  // ‖t‖² of each tensor of a list (float64 [n]): the squared gradient norms
  // the noise-scale estimator reads every step, in one pass over memory.
  m.def("sq_norms(Tensor[] tensors) -> Tensor");
  // Not tensor ops: the cost model and what this build contains, for the
  // Python layer and `python -m gradnoise info`.
  m.def("linear_norm_method(int B, int T, int d, int p, bool with_weight_grad) -> int",
        &linear_norm_method);
  m.def("build_info() -> str", &build_info);
}

}  // namespace gradnoise

// Importing gradnoise._C loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "gradnoise compiled kernels", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
