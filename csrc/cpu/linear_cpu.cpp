// CPU kernels of the Linear per-sample-norm ops (schemas in registration.cpp).
//
// Methods (docs/design.md §1), for X_i [T, d], dY_i [T, p], G_i = dY_iᵀ X_i:
//   goodfellow  T = 1: ‖G_i‖² = ‖x_i‖²‖dy_i‖²                (Goodfellow 2015)
//   ghost       ‖G_i‖² = ⟨X_i X_iᵀ, dY_i dY_iᵀ⟩_F             (Li et al. 2021)
//   fused       G_i tile by tile inside the weight-gradient GEMM, squared in
//               registers at each sample boundary (fused_engine.h)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/fused_engine.h"
#include "cpu/vec_kernels.h"
#include "tensor_checks.h"

namespace gradnoise {
namespace {

// [B, *, f] -> [B, T, f] with rows of f contiguous and equally spaced, so that
// row b·T + t starts at b·T·ld + t·ld (a view when possible).
at::Tensor as_btf(const at::Tensor& t) {
  int64_t T_len = 1;
  for (int64_t k = 1; k < t.dim() - 1; ++k) T_len *= t.size(k);
  at::Tensor r = t.reshape({t.size(0), T_len, t.size(-1)});
  const bool rows_regular = (r.size(2) <= 1 || r.stride(2) == 1) &&
                            (r.size(1) <= 1 || r.size(0) <= 1 || r.stride(0) == r.size(1) * r.stride(1));
  if (!rows_regular) r = r.contiguous();
  return r;
}

struct Problem {
  int64_t B, T, d, p;
};

Problem check_inputs(const at::Tensor& x, const at::Tensor& g, c10::string_view method) {
  check_tensor_pair(x, g, "[B, ..., features]", at::kCPU, "CPU");
  TORCH_CHECK(x.dim() == g.dim() && x.sizes().slice(0, x.dim() - 1) == g.sizes().slice(0, g.dim() - 1),
              "gradnoise: `x` of shape ", x.sizes(), " and `grad_out` of shape ", g.sizes(),
              " must agree on every dimension but the last");
  TORCH_CHECK(method == "auto" || method == "goodfellow" || method == "ghost" || method == "fused",
              "gradnoise: unknown `method` '", std::string(method),
              "'; choose auto, goodfellow, ghost or fused");
  Problem pr{x.size(0), 1, x.size(-1), g.size(-1)};
  for (int64_t k = 1; k < x.dim() - 1; ++k) pr.T *= x.size(k);
  TORCH_CHECK(method != "goodfellow" || pr.T == 1,
              "gradnoise: method 'goodfellow' needs T = 1, but `x` of shape ", x.sizes(),
              " has T = ", pr.T, "; use 'ghost', 'fused' or 'auto'");
  return pr;
}

NormMethod resolve_method(c10::string_view method, const Problem& pr, bool with_weight_grad) {
  if (method == "goodfellow") return NormMethod::kGoodfellow;
  if (method == "ghost") return NormMethod::kGhost;
  if (method == "fused") return NormMethod::kFused;
  return choose_linear_norm_method(pr.B, pr.T, pr.d, pr.p, with_weight_grad);
}

// Norms accumulate in double inside the kernels and are returned as float32
// (float64 for float64 input).
at::Tensor fused_norms(const at::Tensor& x3, const at::Tensor& g3, at::Tensor* grad_weight) {
  const int64_t B = x3.size(0), d = x3.size(2), p = g3.size(2);
  at::Tensor norms = at::empty({B}, x3.options().dtype(at::kDouble));
  double* nptr = norms.data_ptr<double>();
  const auto st = x3.scalar_type();
  at::Tensor C;  // accumulator for the weight gradient, in the accumulation dtype
  if (grad_weight != nullptr) {
    C = (st == at::kFloat || st == at::kDouble) ? at::empty({p, d}, x3.options())
                                                 : at::empty({p, d}, x3.options().dtype(at::kFloat));
  }
  // Row r = b·T + t of the flattened [B·T, f] problem starts at r·ld.
  const int64_t T_len = x3.size(1);
  const OperandSource xs{OperandSource::Kind::kRows, x3.data_ptr(),
                         T_len == 1 ? x3.stride(0) : x3.stride(1)};
  const OperandSource gs{OperandSource::Kind::kRows, g3.data_ptr(),
                         T_len == 1 ? g3.stride(0) : g3.stride(1)};
  // Scratch (the packed operands of a group of samples) is held to a quarter
  // of the tensors read, within the engine's default and 1 MB, so that
  // measuring adds little to a step's peak memory.
  const int64_t scratch = std::clamp<int64_t>(B * T_len * (d + p) * x3.element_size() / 4,
                                              1 << 20, kDefaultScratchBytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "gradnoise_fused_linear", [&] {
    using acc_t = acc_of<scalar_t>;
    acc_t* cptr = C.defined() ? C.data_ptr<acc_t>() : nullptr;
    run_fused_kernel<scalar_t, acc_t>(xs, gs, B, T_len, d, p, cptr, nptr, scratch);
  });
  if (grad_weight != nullptr) *grad_weight = C.scalar_type() == st ? C : C.to(st);
  return norms;
}

// T = 1: ‖dy_i x_iᵀ‖² = ‖x_i‖²·‖dy_i‖² (Goodfellow 2015), plus the bias's
// ‖dy_i‖² when `with_bias`: (‖x_i‖² + 1)·‖dy_i‖². Cost 2B(d + p). With a bias
// gradient wanted, the same pass over dY also sums Σ_i dy_i: this runs at
// every T = 1 Linear backward, where one pass (before the GEMM, while dY is
// in cache) instead of a norms pass plus a bias reduction is a visible part
// of the layer's time.
template <int VB, typename S>
struct GoodfellowKernel {
  using A = acc_of<S>;
  // Bias sums are carried in A over at most this many rows, then in double.
  static constexpr int64_t kFlushRows = 64;

  // Rows [b0, b1): out[i] = (‖x_i‖² + extra)·‖g_i‖², formed in double;
  // bias (if not null) += Σ_i g_i. buf: max(d, p) A (half-precision
  // conversion), block: p A.
  static GN_INLINE void rows(const S* x, const S* g, int64_t d, int64_t p, int64_t b0,
                             int64_t b1, double extra, A* out, double* bias, A* buf, A* block) {
    int64_t pending = 0;
    auto flush = [&] {
      for (int64_t j = 0; j < p; ++j) {
        bias[j] += static_cast<double>(block[j]);
        block[j] = A(0);
      }
      pending = 0;
    };
    for (int64_t i = b0; i < b1; ++i) {
      const A sx = reduce<VB, A>(as_acc<S, A>(x + i * d, d, buf), d, Square{});
      const A* gi = as_acc<S, A>(g + i * p, p, buf);
      const A sg = reduce<VB, A>(gi, p, Square{});
      out[i] = static_cast<A>((static_cast<double>(sx) + extra) * static_cast<double>(sg));
      if (bias != nullptr) {
        add_into(block, gi, p);
        if (++pending == kFlushRows) flush();
      }
    }
    if (bias != nullptr && pending > 0) flush();
  }
};

#define GN_LINEAR_ISA(NAME, VB, TARGET)                                                        \
  struct NAME {                                                                                \
    template <typename S>                                                                      \
    TARGET static void goodfellow_rows(const S* x, const S* g, int64_t d, int64_t p,           \
                                       int64_t b0, int64_t b1, double extra, acc_of<S>* out,  \
                                       double* bias, acc_of<S>* buf, acc_of<S>* block) {      \
      GoodfellowKernel<VB, S>::rows(x, g, d, p, b0, b1, extra, out, bias, buf, block);         \
    }                                                                                          \
  };
GN_LINEAR_ISA(LinearAvx512, 64, __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))))
GN_LINEAR_ISA(LinearAvx2, 32, __attribute__((target("avx2,fma"))))
GN_LINEAR_ISA(LinearGeneric, 16, )
#undef GN_LINEAR_ISA

// Norms in the accumulation dtype; with `grad_bias`, the bias gradient (same
// dtype) from a fixed set of contiguous sample blocks summed in double, so
// that it is the same for any number of threads.
at::Tensor goodfellow_norms(const at::Tensor& x3, const at::Tensor& g3, bool with_bias,
                            at::Tensor* grad_bias = nullptr) {
  constexpr int64_t kBiasBlocks = 8;
  const int64_t B = x3.size(0), d = x3.size(2), p = g3.size(2);
  at::Tensor xc = x3.reshape({B, d}).contiguous(), gc = g3.reshape({B, p}).contiguous();
  const auto acc = acc_type(x3.scalar_type());
  at::Tensor norms = at::empty({B}, x3.options().dtype(acc));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d + p));
  const int64_t blocks = grad_bias != nullptr ? std::min<int64_t>(kBiasBlocks, ceil_div(B, grain))
                                              : ceil_div(B, grain);
  std::vector<double> bias_part(grad_bias != nullptr ? static_cast<size_t>(blocks * p) : 0, 0.0);
  const double extra = with_bias ? 1.0 : 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x3.scalar_type(), "gradnoise_goodfellow", [&] {
    using A = acc_of<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    A* out = norms.data_ptr<A>();
    with_isa<LinearAvx512, LinearAvx2, LinearGeneric>([&](auto isa) {
      at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
        std::vector<A> buf(static_cast<size_t>(std::max(d, p))), block(static_cast<size_t>(p), A(0));
        for (int64_t k = k0; k < k1; ++k)
          isa.template goodfellow_rows<scalar_t>(
              xp, gp, d, p, k * B / blocks, (k + 1) * B / blocks, extra, out,
              grad_bias != nullptr ? bias_part.data() + k * p : nullptr, buf.data(), block.data());
      });
    });
    if (grad_bias != nullptr) {
      at::Tensor gb = at::empty({p}, x3.options().dtype(acc));
      A* gbp = gb.data_ptr<A>();
      for (int64_t j = 0; j < p; ++j) {
        double v = 0.0;
        for (int64_t k = 0; k < blocks; ++k) v += bias_part[k * p + j];
        gbp[j] = static_cast<A>(v);
      }
      *grad_bias = gb;
    }
  });
  return norms;
}

// ‖G_i‖² = ⟨X_i X_iᵀ, dY_i dY_iᵀ⟩_F (Li et al. 2021). The T×T Gram matrices
// are formed in blocks of at most kGhostBlock rows, so the memory is
// O(threads·kGhostBlock²) rather than O(B·T²); off-diagonal blocks count twice.
at::Tensor ghost_norms(const at::Tensor& x3, const at::Tensor& g3) {
  constexpr int64_t kGhostBlock = 256;
  const int64_t B = x3.size(0), T_len = x3.size(1);
  const auto acc = acc_type(x3.scalar_type());
  at::Tensor xa = x3.to(acc), ga = g3.to(acc);
  const int64_t nb = ceil_div(T_len, kGhostBlock);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t a = 0; a < nb; ++a)
    for (int64_t b = a; b < nb; ++b) pairs.emplace_back(a, b);
  const int64_t items = B * static_cast<int64_t>(pairs.size());
  std::vector<double> part(static_cast<size_t>(items), 0.0);
  at::parallel_for(0, items, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / static_cast<int64_t>(pairs.size());
      const auto [a, b] = pairs[w % pairs.size()];
      const int64_t a0 = a * kGhostBlock, a1 = std::min(T_len, a0 + kGhostBlock);
      const int64_t b0 = b * kGhostBlock, b1 = std::min(T_len, b0 + kGhostBlock);
      at::Tensor xi = xa[i], gi = ga[i];
      at::Tensor gram_x = at::mm(xi.slice(0, a0, a1), xi.slice(0, b0, b1).t());
      at::Tensor gram_g = at::mm(gi.slice(0, a0, a1), gi.slice(0, b0, b1).t());
      const double v = (gram_x * gram_g).sum().item<double>();
      part[w] = a == b ? v : 2.0 * v;
    }
  });
  at::Tensor norms = at::zeros({B}, x3.options().dtype(at::kDouble));
  double* out = norms.data_ptr<double>();
  for (int64_t w = 0; w < items; ++w) out[w / static_cast<int64_t>(pairs.size())] += part[w];
  return norms;
}

// Σ_t dY_i,t per sample: its squared norm is the bias part of sample i's norm,
// and its sum over samples is the bias gradient.
std::pair<at::Tensor, at::Tensor> bias_grad_and_sq_norms(const at::Tensor& g3) {
  const auto acc = acc_type(g3.scalar_type());
  // [B, p]; T = 1 needs no reduction (nor a copy, in the accumulation dtype).
  at::Tensor per_sample = g3.size(1) == 1 ? g3.select(1, 0).to(acc) : g3.sum(1, false, acc);
  at::Tensor sq = per_sample.square().sum(1).to(at::kDouble);
  at::Tensor grad_bias = per_sample.sum(0).to(g3.scalar_type());
  return {grad_bias, sq};
}

at::Tensor finish_norms(at::Tensor norms, const at::Tensor& x) {
  return norms.to(acc_type(x.scalar_type()));
}

at::Tensor zero_norms(const Problem& pr, const at::Tensor& x) {
  return at::zeros({pr.B}, x.options().dtype(acc_type(x.scalar_type())));
}

at::Tensor linear_sq_norms_cpu(const at::Tensor& x, const at::Tensor& grad_out, bool with_bias,
                               c10::string_view method) {
  const Problem pr = check_inputs(x, grad_out, method);
  if (pr.B == 0 || pr.T == 0 || pr.d == 0 || pr.p == 0) {
    at::Tensor n = zero_norms(pr, x);
    if (with_bias && pr.B > 0 && pr.T > 0 && pr.p > 0)
      n = finish_norms(bias_grad_and_sq_norms(as_btf(grad_out)).second, x);
    return n;
  }
  const at::Tensor x3 = as_btf(x), g3 = as_btf(grad_out);
  at::Tensor norms;
  switch (resolve_method(method, pr, /*with_weight_grad=*/false)) {
    case NormMethod::kGoodfellow: return goodfellow_norms(x3, g3, with_bias);
    case NormMethod::kGhost: norms = ghost_norms(x3, g3); break;
    default: norms = fused_norms(x3, g3, nullptr);
  }
  if (with_bias) norms = norms + bias_grad_and_sq_norms(g3).second;
  return finish_norms(norms, x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_weight_grad_and_sq_norms_cpu(
    const at::Tensor& x, const at::Tensor& grad_out, bool with_bias, c10::string_view method) {
  const Problem pr = check_inputs(x, grad_out, method);
  const auto st = x.scalar_type();
  at::Tensor empty_bias = at::empty({0}, x.options());
  if (pr.B == 0 || pr.T == 0 || pr.d == 0 || pr.p == 0) {
    at::Tensor gw = at::zeros({pr.p, pr.d}, x.options());
    at::Tensor n = zero_norms(pr, x);
    at::Tensor gb = with_bias ? at::zeros({pr.p}, x.options()) : empty_bias;
    if (with_bias && pr.B > 0 && pr.T > 0 && pr.p > 0) {
      auto [b, sq] = bias_grad_and_sq_norms(as_btf(grad_out));
      gb = b;
      n = finish_norms(sq, x);
    }
    return {gw, gb, n};
  }
  const at::Tensor x3 = as_btf(x), g3 = as_btf(grad_out);
  at::Tensor grad_weight, norms;
  const NormMethod m = resolve_method(method, pr, /*with_weight_grad=*/true);
  if (m == NormMethod::kFused) {
    norms = fused_norms(x3, g3, &grad_weight);
  } else {
    // The norms are cheap next to the GEMM here: leave the GEMM to BLAS.
    const auto acc = acc_type(st);
    at::Tensor g2 = g3.reshape({-1, pr.p}), x2 = x3.reshape({-1, pr.d});
    if (m == NormMethod::kGoodfellow) {  // the bias's norm is folded in
      // Norms before the GEMM: the GEMM's passes over X and dY would push them
      // out of cache.
      at::Tensor grad_bias = empty_bias;
      norms = goodfellow_norms(x3, g3, with_bias, with_bias ? &grad_bias : nullptr);
      if (grad_bias.scalar_type() != st) grad_bias = grad_bias.to(st);
      grad_weight = acc == st ? at::mm(g2.t(), x2) : at::mm(g2.t().to(acc), x2.to(acc)).to(st);
      return {grad_weight, grad_bias, norms};
    }
    grad_weight = acc == st ? at::mm(g2.t(), x2) : at::mm(g2.t().to(acc), x2.to(acc)).to(st);
    norms = ghost_norms(x3, g3);
  }
  at::Tensor grad_bias = empty_bias;
  if (with_bias) {
    auto [b, sq] = bias_grad_and_sq_norms(g3);
    grad_bias = b;
    norms = norms + sq;
  }
  return {grad_weight, grad_bias, finish_norms(norms, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CPU, m) {
  m.impl("linear_sq_norms", &linear_sq_norms_cpu);
  m.impl("linear_weight_grad_and_sq_norms", &linear_weight_grad_and_sq_norms_cpu);
}

}  // namespace gradnoise
