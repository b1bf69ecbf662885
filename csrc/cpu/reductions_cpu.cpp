// CPU kernel of `sq_norms` (schema in registration.cpp): ‖t‖² of each tensor
// of a list, as float64 [n].
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

#define GN_REDUCTION_ISA(NAME, VB, TARGET)                                    \
  struct NAME {                                                              \
    template <typename S>                                                    \
    TARGET static double chunk(const S* p, int64_t n, float* buf) {          \
      return SqNormKernel<VB, S>::chunk(p, n, buf);                          \
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

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CPU, m) { m.impl("sq_norms", &sq_norms_cpu); }

}  // namespace gradnoise
