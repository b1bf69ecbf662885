// Vector building blocks of the CPU kernels, in GCC vector types. Everything
// here is always_inline, so that it is compiled with the instruction set of
// the per-ISA entry point it lands in (see cpu_isa.h); VB is the vector width
// in bytes (64 AVX-512, 32 AVX2, 16 SSE2).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gradnoise {

#define GN_INLINE inline __attribute__((always_inline))

// The vector helpers are always inlined: no vector crosses a call boundary, so
// GCC's note that wide vectors change the calling convention does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <int VB, typename A>
struct Vec {
  typedef A type __attribute__((vector_size(VB)));
};

template <int VB, typename A>
GN_INLINE typename Vec<VB, A>::type vload(const A* p) {
  typename Vec<VB, A>::type v;
  std::memcpy(&v, p, VB);
  return v;
}

struct Ident {
  template <typename X>
  GN_INLINE X operator()(const X& x) const { return x; }
};
struct Square {
  template <typename X>
  GN_INLINE X operator()(const X& x) const { return x * x; }
};
template <typename A>
struct SqDev {
  A mean;
  template <typename X>
  GN_INLINE X operator()(const X& x) const {
    const X d = x - mean;
    return d * d;
  }
};

// Sum of a vector's lanes, as a tree.
template <int VB, typename A>
GN_INLINE A hsum(const typename Vec<VB, A>::type& v) {
  constexpr int L = VB / sizeof(A);
  A t[L];
  std::memcpy(t, &v, VB);
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// Σ_j op(a[j]) with four vector accumulators (latency).
template <int VB, typename A, typename Op>
GN_INLINE A reduce(const A* __restrict a, int64_t n, const Op& op) {
  using V = typename Vec<VB, A>::type;
  constexpr int64_t L = VB / sizeof(A);
  A r = 0;
  int64_t j = 0;
  if (n >= L) {
    V s0{}, s1{}, s2{}, s3{};
    for (; j + 4 * L <= n; j += 4 * L) {
      s0 += op(vload<VB>(a + j));
      s1 += op(vload<VB>(a + j + L));
      s2 += op(vload<VB>(a + j + 2 * L));
      s3 += op(vload<VB>(a + j + 3 * L));
    }
    for (; j + L <= n; j += L) s0 += op(vload<VB>(a + j));
    r = hsum<VB, A>((s0 + s1) + (s2 + s3));
  }
  for (; j < n; ++j) r += op(a[j]);
  return r;
}

// out[r] = Σ_j op[r](a[r][j]) for NR rows at once: NR independent chains,
// which is what keeps short rows from being bound by the latency of adds.
template <int VB, int NR, typename A, typename Op>
GN_INLINE void reduce_rows(const A* const* a, int64_t n, const Op* op, A* out) {
  using V = typename Vec<VB, A>::type;
  constexpr int64_t L = VB / sizeof(A);
  V s[NR][2] = {};
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    for (int r = 0; r < NR; ++r) {
      s[r][0] += op[r](vload<VB>(a[r] + j));
      s[r][1] += op[r](vload<VB>(a[r] + j + L));
    }
  }
  for (; j + L <= n; j += L)
    for (int r = 0; r < NR; ++r) s[r][0] += op[r](vload<VB>(a[r] + j));
  for (int r = 0; r < NR; ++r) {
    A v = hsum<VB, A>(s[r][0] + s[r][1]);
    for (int64_t k = j; k < n; ++k) v += op[r](a[r][k]);
    out[r] = v;
  }
}

// dot = Σ_j g[j]·(x[j] − mean) and sum = Σ_j g[j] in one pass.
template <int VB, typename A>
GN_INLINE void dot_dev_and_sum(const A* __restrict x, const A* __restrict g, int64_t n, A mean,
                               A& dot, A& sum) {
  using V = typename Vec<VB, A>::type;
  constexpr int64_t L = VB / sizeof(A);
  A d = 0, s = 0;
  int64_t j = 0;
  if (n >= L) {
    V d0{}, d1{}, s0{}, s1{};
    for (; j + 2 * L <= n; j += 2 * L) {
      const V g0 = vload<VB>(g + j), g1 = vload<VB>(g + j + L);
      d0 += g0 * (vload<VB>(x + j) - mean);
      d1 += g1 * (vload<VB>(x + j + L) - mean);
      s0 += g0;
      s1 += g1;
    }
    for (; j + L <= n; j += L) {
      const V g0 = vload<VB>(g + j);
      d0 += g0 * (vload<VB>(x + j) - mean);
      s0 += g0;
    }
    d = hsum<VB, A>(d0 + d1);
    s = hsum<VB, A>(s0 + s1);
  }
  for (; j < n; ++j) {
    d += g[j] * (x[j] - mean);
    s += g[j];
  }
  dot = d;
  sum = s;
}

// Half-precision bits to float, branch-free so that the loop vectorises
// (bfloat16: the top half of a float; float16: the conversion of Dukhan's FP16
// library, exact for every value including subnormals, infinities and NaN).
GN_INLINE float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }

GN_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? std::bit_cast<uint32_t>(denormalized)
                                           : std::bit_cast<uint32_t>(normalized);
  return std::bit_cast<float>(sign | bits);
}

// The n values at p in the accumulation type: p itself, or converted into buf.
template <typename S, typename A>
GN_INLINE const A* as_acc(const S* p, int64_t n, A* __restrict buf) {
  if constexpr (std::is_same_v<S, A>) {
    return p;
  } else {
    const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(p);
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_float(bits[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) buf[j] = fp16_to_float(bits[j]);
    }
    return buf;
  }
}

template <typename A>
GN_INLINE void add_into(A* __restrict dst, const A* __restrict src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

}  // namespace gradnoise
