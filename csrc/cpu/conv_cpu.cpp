// CPU kernels of the convolution per-sample-norm ops (schemas in
// registration.cpp).
//
// A convolution is a Linear problem per sample and group (Rochette et al.
// 2019): X_i [L, C_in/G·k] (patches at the L output positions) and
// dY_i [L, C_out/G], G_i = dY_iᵀ X_i. The fused engine gathers the patches
// from the input image while packing its operands, so the weight gradient
// and the per-sample norms come out of one pass over (x, dY) with no
// unfolded copy of the input.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/fused_engine.h"
#include "tensor_checks.h"

namespace gradnoise {
namespace {

struct ConvProblem {
  int64_t B, C, C_out, groups, L;
  ConvGeometry geo;  // channels = C / groups
};

ConvProblem check_conv(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  TORCH_CHECK(nd >= 1 && nd <= 3, "gradnoise: `kernel_size` must have 1, 2 or 3 entries, got ",
              kernel_size);
  check_tensor_pair(x, g, "[B, channels, *spatial]", at::kCPU, "CPU");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x}, {"grad_out", g}})
    TORCH_CHECK(t.dim() == nd + 2, "gradnoise: `", name, "` must be [B, channels, ", nd,
                " spatial dims] for a ", nd, "-D convolution, got shape ", t.sizes());
  for (const auto& [name, v] : {std::pair<const char*, at::IntArrayRef>{"stride", stride},
                                {"padding", padding}, {"dilation", dilation}})
    TORCH_CHECK(static_cast<int64_t>(v.size()) == nd, "gradnoise: `", name, "` must have ", nd,
                " entries like `kernel_size`, got ", v);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && g.size(1) % groups == 0,
              "gradnoise: `groups` = ", groups, " must divide the input channels (", x.size(1),
              ") and the output channels (", g.size(1), ")");
  TORCH_CHECK(x.size(0) == g.size(0), "gradnoise: `x` has batch ", x.size(0), " but `grad_out` has ",
              g.size(0));
  ConvProblem pr{x.size(0), x.size(1), g.size(1), groups, 1, {}};
  pr.geo.channels = x.size(1) / groups;
  for (int64_t k = 0; k < 3; ++k) {
    const int64_t s = k - (3 - nd);  // index into the op's lists, < 0 for padded dims
    const bool real = s >= 0;
    pr.geo.in[k] = real ? x.size(2 + s) : 1;
    pr.geo.out[k] = real ? g.size(2 + s) : 1;
    pr.geo.kernel[k] = real ? kernel_size[s] : 1;
    pr.geo.stride[k] = real ? stride[s] : 1;
    pr.geo.padding[k] = real ? padding[s] : 0;
    pr.geo.dilation[k] = real ? dilation[s] : 1;
    TORCH_CHECK(pr.geo.kernel[k] >= 1 && pr.geo.stride[k] >= 1 && pr.geo.dilation[k] >= 1 &&
                    pr.geo.padding[k] >= 0,
                "gradnoise: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
                "kernel_size=", kernel_size, " stride=", stride, " padding=", padding,
                " dilation=", dilation);
    if (real) {
      const int64_t span = pr.geo.dilation[k] * (pr.geo.kernel[k] - 1) + 1;
      const int64_t want = pr.geo.in[k] + 2 * pr.geo.padding[k] >= span
                               ? (pr.geo.in[k] + 2 * pr.geo.padding[k] - span) / pr.geo.stride[k] + 1
                               : 0;
      TORCH_CHECK(pr.geo.out[k] == want, "gradnoise: `grad_out` of shape ", g.sizes(),
                  " does not match the convolution of `x` of shape ", x.sizes(), " (spatial dim ",
                  s, " should be ", want, " for kernel_size=", kernel_size, " stride=", stride,
                  " padding=", padding, " dilation=", dilation, ")");
    }
    pr.L *= pr.geo.out[k];
  }
  return pr;
}

// (grad_weight [C_out, C/G, *k] or undefined, grad_bias [C_out] or [0], norms [B]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_impl(
    const at::Tensor& x_in, const at::Tensor& g_in, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool with_bias, bool with_weight_grad) {
  const ConvProblem pr = check_conv(x_in, g_in, kernel_size, stride, padding, dilation, groups);
  const auto st = x_in.scalar_type(), acc = acc_type(st);
  const int64_t nd = static_cast<int64_t>(kernel_size.size());
  // Channels-last input is read as it is; anything else as channels-first.
  std::vector<int64_t> to_last{0};
  for (int64_t k = 0; k < nd; ++k) to_last.push_back(2 + k);
  to_last.push_back(1);
  const bool channels_last = x_in.permute(to_last).is_contiguous();
  const at::Tensor x = channels_last ? x_in : x_in.contiguous(), g = g_in.contiguous();
  ConvGeometry geo = pr.geo;
  const int64_t vol = geo.in[0] * geo.in[1] * geo.in[2];
  geo.channel_stride = channels_last ? 1 : vol;
  geo.pixel_stride = channels_last ? pr.C : 1;
  int64_t kvol = 1;
  for (int64_t k : kernel_size) kvol *= k;
  const int64_t d = pr.geo.channels * kvol, p = pr.C_out / groups;
  // Computed as [C_out, *k, C/G] (the patch column order), returned as the
  // weight's [C_out, C/G, *k].
  std::vector<int64_t> cshape{pr.C_out};
  cshape.insert(cshape.end(), kernel_size.begin(), kernel_size.end());
  cshape.push_back(pr.geo.channels);
  at::Tensor C = with_weight_grad ? at::zeros(cshape, x.options().dtype(acc)) : at::Tensor();
  at::Tensor norms = at::zeros({pr.B}, x.options().dtype(at::kDouble));
  if (pr.B > 0 && pr.L > 0 && d > 0 && p > 0) {
    const int64_t esize = x.element_size();
    // The packed patches outgrow the image by the kernel volume: scratch is
    // held to a quarter of the tensors read (within the engine's default and
    // 1 MB), so that measuring adds little to a step's peak memory.
    const int64_t scratch = std::clamp<int64_t>((x.nbytes() + g.nbytes()) / 4, 1 << 20,
                                                kDefaultScratchBytes);
    at::Tensor part = groups > 1 ? at::empty({pr.B}, norms.options()) : norms;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const OperandSource xs{
          OperandSource::Kind::kPatches,
          static_cast<const char*>(x.data_ptr()) + gi * geo.channels * geo.channel_stride * esize,
          x.stride(0), &geo};
      const OperandSource gs{OperandSource::Kind::kChannelsFirst,
                             static_cast<const char*>(g.data_ptr()) + gi * p * pr.L * esize,
                             pr.C_out * pr.L};
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "gradnoise_conv", [&] {
        using acc_t = acc_of<scalar_t>;
        acc_t* cptr = C.defined() ? C.data_ptr<acc_t>() + gi * p * d : nullptr;
        run_fused_kernel<scalar_t, acc_t>(xs, gs, pr.B, pr.L, d, p, cptr, part.data_ptr<double>(),
                                          scratch);
      });
      if (groups > 1) norms += part;
    }
  }
  if (C.defined()) {
    std::vector<int64_t> to_weight{0, nd + 1};
    for (int64_t k = 0; k < nd; ++k) to_weight.push_back(1 + k);
    C = C.permute(to_weight).contiguous();
  }
  at::Tensor grad_bias = at::empty({0}, x.options());
  if (with_bias) {
    // Σ_positions dY per sample: its squared norm is the bias part of the
    // sample's norm, and its sum over samples the bias gradient.
    const at::Tensor per_sample = g.reshape({pr.B, pr.C_out, pr.L}).sum(2, false, acc);
    norms += per_sample.square().sum(1, false, at::kDouble);
    grad_bias = per_sample.sum(0).to(st);
  }
  at::Tensor grad_weight = C.defined() ? (C.scalar_type() == st ? C : C.to(st)) : at::empty({0}, x.options());
  return {grad_weight, grad_bias, norms.to(acc)};
}

at::Tensor conv_sq_norms_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             bool with_bias) {
  return std::get<2>(
      conv_impl(x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_weight_grad_and_sq_norms_cpu(
    const at::Tensor& x, const at::Tensor& grad_out, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool with_bias) {
  return conv_impl(x, grad_out, kernel_size, stride, padding, dilation, groups, with_bias, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CPU, m) {
  m.impl("conv_sq_norms", &conv_sq_norms_cpu);
  m.impl("conv_weight_grad_and_sq_norms", &conv_weight_grad_and_sq_norms_cpu);
}

}  // namespace gradnoise
