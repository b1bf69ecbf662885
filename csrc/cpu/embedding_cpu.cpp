// CPU kernel of `embedding_sq_norms` (schema in registration.cpp): per-sample
// squared gradient norms of an nn.Embedding's weight.
//
// Row v of sample i's gradient is Σ_{t: tok_i,t = v} dY_i,t, so
// ‖G_i‖² = Σ_v ‖Σ_{t: tok_i,t = v} dY_i,t‖²: each sample's positions are
// sorted by token, each run of equal tokens is summed, and the sums are
// squared. Rows of padding_idx get no gradient. O(T log T + T·d) a sample;
// samples are shared among threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/vec_kernels.h"
#include "tensor_checks.h"

namespace gradnoise {
namespace {

template <int VB, typename S>
struct EmbeddingKernel {
  using A = acc_of<S>;
  // Sample i: `order` holds (token, position) of its non-padding positions.
  static GN_INLINE double sample(const S* g, int64_t d, std::vector<std::pair<int64_t, int64_t>>& order,
                                 A* row, A* sum) {
    std::sort(order.begin(), order.end());
    double total = 0.0;
    for (size_t k = 0; k < order.size();) {
      size_t end = k + 1;
      while (end < order.size() && order[end].first == order[k].first) ++end;
      if (end == k + 1) {
        total += reduce<VB, A>(as_acc<S, A>(g + order[k].second * d, d, row), d, Square{});
      } else {
        std::fill(sum, sum + d, A(0));
        for (size_t r = k; r < end; ++r) add_into(sum, as_acc<S, A>(g + order[r].second * d, d, row), d);
        total += reduce<VB, A>(sum, d, Square{});
      }
      k = end;
    }
    return total;
  }
};

#define GN_EMBEDDING_ISA(NAME, VB, TARGET)                                                    \
  struct NAME {                                                                              \
    template <typename S>                                                                    \
    TARGET static double sample(const S* g, int64_t d,                                       \
                                std::vector<std::pair<int64_t, int64_t>>& order,             \
                                acc_of<S>* row, acc_of<S>* sum) {                            \
      return EmbeddingKernel<VB, S>::sample(g, d, order, row, sum);                          \
    }                                                                                        \
  };
GN_EMBEDDING_ISA(EmbeddingAvx512, 64, __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))))
GN_EMBEDDING_ISA(EmbeddingAvx2, 32, __attribute__((target("avx2,fma"))))
GN_EMBEDDING_ISA(EmbeddingGeneric, 16, )
#undef GN_EMBEDDING_ISA

at::Tensor embedding_sq_norms_cpu(const at::Tensor& indices, const at::Tensor& grad_out,
                                  int64_t num_embeddings, int64_t padding_idx) {
  TORCH_CHECK(indices.device().is_cpu() && grad_out.device().is_cpu(),
              "gradnoise: `indices` and `grad_out` must be CPU tensors for the CPU kernels, got ",
              indices.device(), " and ", grad_out.device());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "gradnoise: `indices` must be int64 or int32, got ", indices.scalar_type());
  const auto st = grad_out.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "gradnoise: `grad_out` has dtype ", st,
              "; supported dtypes are float32, float64, bfloat16 and float16");
  TORCH_CHECK(indices.dim() >= 1 && grad_out.dim() == indices.dim() + 1 &&
                  grad_out.sizes().slice(0, indices.dim()) == indices.sizes(),
              "gradnoise: `grad_out` of shape ", grad_out.sizes(), " must be `indices`' shape ",
              indices.sizes(), " plus the embedding dimension");
  const int64_t B = indices.size(0);
  const int64_t T = B == 0 ? 0 : indices.numel() / B;
  const int64_t d = grad_out.size(-1);
  at::Tensor out = at::zeros({B}, grad_out.options().dtype(acc_type(st)));
  if (B == 0 || T == 0 || d == 0) return out;
  const at::Tensor idx = indices.reshape({B, T}).to(at::kLong).contiguous();
  const at::Tensor g = grad_out.reshape({B, T, d}).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < B * T; ++k)
    TORCH_CHECK_VALUE(ip[k] >= 0 && ip[k] < num_embeddings, "gradnoise: token id ", ip[k],
                " (sample ", k / T, ", position ", k % T, ") is outside the embedding's ",
                num_embeddings, " rows");
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T * d));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "gradnoise_embedding_sq_norms", [&] {
    using A = acc_of<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    A* op = out.data_ptr<A>();
    with_isa<EmbeddingAvx512, EmbeddingAvx2, EmbeddingGeneric>([&](auto isa) {
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<std::pair<int64_t, int64_t>> order;
        order.reserve(static_cast<size_t>(T));
        std::vector<A> row(static_cast<size_t>(d)), sum(static_cast<size_t>(d));
        for (int64_t i = b0; i < b1; ++i) {
          order.clear();
          for (int64_t t = 0; t < T; ++t)
            if (ip[i * T + t] != padding_idx) order.emplace_back(ip[i * T + t], t);
          op[i] = static_cast<A>(isa.template sample<scalar_t>(gp + i * T * d, d, order,
                                                               row.data(), sum.data()));
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CPU, m) { m.impl("embedding_sq_norms", &embedding_sq_norms_cpu); }

}  // namespace gradnoise
