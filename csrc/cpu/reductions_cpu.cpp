// CPU kernels of `sq_norms` (schema in registration.cpp): ‖t‖² of each
// tensor of a list, as float64 [n]; and of `row_sq_norms`: ‖t_i‖² of each
// row i (all but dim 0), optionally times (scale_i + extra).
//
// Every tensor is cut into chunks of kChunk elements and all chunks of all
// tensors are shared among the threads, so that one call streams the whole
// list from memory with every core (a step's gradients are read once, and
// that read is bandwidth-bound). Chunks are summed as SqNormKernel says,
// and their sums are added in double in chunk order: the result is the same
// for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/cpu_isa.h"
#include "cpu/vec_kernels.h"
#include "tensor_checks.h"

namespace gradnoise {
namespace {

constexpr int64_t kChunk = 1 << 15;

// Σ p[j]²: blocks of 16·4 vectors are squared and summed in float (each
// lane adds 16 squares) and each block's sum is added in double, so that
// the loop runs at the speed of memory with float-only arithmetic while the
// total keeps double's range and digits. A block whose float sum overflows
// (elements beyond ~1e19) is summed again in double.
template <int VB, typename S>
struct SqNormKernel {
  static GN_INLINE double block_in_double(const float* a, int64_t n) {
    double r = 0.0;
    for (int64_t j = 0; j < n; ++j) r += static_cast<double>(a[j]) * static_cast<double>(a[j]);
    return r;
  }

  static GN_INLINE double chunk(const S* p, int64_t n, float* buf) {
    if constexpr (std::is_same_v<S, double>) {
      return reduce<VB, double>(p, n, Square{});
    } else {
      const float* a = as_acc<S, float>(p, n, buf);
      constexpr int64_t L = VB / sizeof(float), kInner = 16, kBlock = 4 * L * kInner;
      using V = typename Vec<VB, float>::type;
      double total = 0.0;
      int64_t j = 0;
      for (; j + kBlock <= n; j += kBlock) {
        V s0{}, s1{}, s2{}, s3{};
        for (int64_t k = 0; k < kBlock; k += 4 * L) {
          const V v0 = vload<VB>(a + j + k), v1 = vload<VB>(a + j + k + L);
          const V v2 = vload<VB>(a + j + k + 2 * L), v3 = vload<VB>(a + j + k + 3 * L);
          s0 += v0 * v0;
          s1 += v1 * v1;
          s2 += v2 * v2;
          s3 += v3 * v3;
        }
        const float block = hsum<VB, float>((s0 + s1) + (s2 + s3));
        total += std::isfinite(block) ? static_cast<double>(block) : block_in_double(a + j, kBlock);
      }
      return total + block_in_double(a + j, n - j);
    }
  }
};

// Rows [b0, b1) of t [B, n]: out[i] = ‖t_i‖², times (scale[i] + extra) if
// scale is not null; each row summed as SqNormKernel sums a chunk (float
// blocks added in double) and the product formed in double.
template <int VB, typename S>
struct RowSqNormKernel {
  using A = acc_of<S>;
  static GN_INLINE void rows(const S* t, int64_t n, int64_t b0, int64_t b1, const A* scale,
                             double extra, A* out, float* buf) {
    for (int64_t i = b0; i < b1; ++i) {
      const double s = SqNormKernel<VB, S>::chunk(t + i * n, n, buf);
      out[i] = static_cast<A>(scale == nullptr ? s : s * (static_cast<double>(scale[i]) + extra));
    }
  }
};

#define GN_REDUCTION_ISA(NAME, VB, TARGET)                                    \
  struct NAME {                                                              \
    template <typename S>                                                    \
    TARGET static double chunk(const S* p, int64_t n, float* buf) {          \
      return SqNormKernel<VB, S>::chunk(p, n, buf);                          \
    }                                                                        \
    template <typename S>                                                    \
    TARGET static void rows(const S* t, int64_t n, int64_t b0, int64_t b1,   \
                            const acc_of<S>* scale, double extra,            \
                            acc_of<S>* out, float* buf) {                    \
      RowSqNormKernel<VB, S>::rows(t, n, b0, b1, scale, extra, out, buf);    \
    }                                                                        \
  };
GN_REDUCTION_ISA(ReductionAvx512, 64, __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))))
GN_REDUCTION_ISA(ReductionAvx2, 32, __attribute__((target("avx2,fma"))))
GN_REDUCTION_ISA(ReductionGeneric, 16, )
#undef GN_REDUCTION_ISA

struct Chunk {
  int64_t tensor, begin, end;
};

at::Tensor sq_norms_cpu(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<at::Tensor> flat(tensors.size());
  std::vector<Chunk> chunks;
  for (int64_t k = 0; k < n; ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.layout() == at::kStrided, "gradnoise.ops.sq_norms: tensor ", k,
                " is sparse; pass its values (t.coalesce().values())");
    TORCH_CHECK(t.device().is_cpu(), "gradnoise.ops.sq_norms: tensor ", k, " is on ", t.device(),
                ", the CPU kernel needs CPU tensors");
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                "gradnoise.ops.sq_norms: tensor ", k, " has dtype ", st,
                "; supported dtypes are float32, float64, bfloat16 and float16");
    flat[k] = t.contiguous().view(-1);
    for (int64_t b = 0; b < flat[k].numel(); b += kChunk)
      chunks.push_back({k, b, std::min(flat[k].numel(), b + kChunk)});
  }
  std::vector<double> part(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf;
    with_isa<ReductionAvx512, ReductionAvx2, ReductionGeneric>([&](auto isa) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        const at::Tensor& t = flat[ch.tensor];
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "gradnoise_sq_norms", [&] {
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>)
            buf.resize(kChunk);
          part[c] = isa.template chunk<scalar_t>(t.data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin,
                                                 buf.data());
        });
      }
    });
  });
  at::Tensor out = at::zeros({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) o[chunks[c].tensor] += part[c];
  return out;
}

at::Tensor row_sq_norms_cpu(const at::Tensor& t, const c10::optional<at::Tensor>& scale,
                            double extra) {
  TORCH_CHECK(t.device().is_cpu(), "gradnoise.ops.row_sq_norms: `t` is on ", t.device(),
              ", the CPU kernel needs CPU tensors");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "gradnoise.ops.row_sq_norms: `t` has dtype ", st,
              "; supported dtypes are float32, float64, bfloat16 and float16");
  TORCH_CHECK(t.dim() >= 1, "gradnoise.ops.row_sq_norms: `t` must have a batch dimension, got a "
              "0-dimensional tensor");
  const int64_t B = t.size(0);
  const int64_t n = B == 0 ? 0 : t.numel() / B;
  const auto acc = acc_type(st);
  at::Tensor sc;
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == B, "gradnoise.ops.row_sq_norms: `scale` "
                "must have shape [", B, "] (one value per row of `t`), got ", scale->sizes());
    TORCH_CHECK(scale->device() == t.device(), "gradnoise.ops.row_sq_norms: `scale` is on ",
                scale->device(), " but `t` is on ", t.device());
    sc = scale->to(acc).contiguous();
  }
  at::Tensor out = at::empty({B}, t.options().dtype(acc));
  if (B == 0) return out;
  const at::Tensor tc = t.reshape({B, n}).contiguous();
  // Rows are shared among threads in blocks of at least ~16 K elements.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "gradnoise_row_sq_norms", [&] {
    using A = acc_of<scalar_t>;
    const scalar_t* tp = tc.data_ptr<scalar_t>();
    const A* sp = sc.defined() ? sc.data_ptr<A>() : nullptr;
    A* op = out.data_ptr<A>();
    with_isa<ReductionAvx512, ReductionAvx2, ReductionGeneric>([&](auto isa) {
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        std::vector<float> buf(std::is_same_v<scalar_t, A> ? 0 : static_cast<size_t>(n));
        isa.template rows<scalar_t>(tp, n, b0, b1, sp, extra, op, buf.data());
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CPU, m) {
  m.impl("sq_norms", &sq_norms_cpu);
  m.impl("row_sq_norms", &row_sq_norms_cpu);
}

}  // namespace gradnoise
