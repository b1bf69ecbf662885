// Which instruction set the CPU kernels run with: the widest this CPU has
// among AVX-512 (F, DQ, VL), AVX2 + FMA and SSE2 ("generic"), or the one
// GRADNOISE_CPU_ISA=avx512|avx2|generic names. Read on every call (cheap),
// so that tests can switch.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace gradnoise {

enum class Isa { kGeneric, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (const char* env = std::getenv("GRADNOISE_CPU_ISA")) {
    const std::string want(env);
    if (want == "generic") return Isa::kGeneric;
    if (want == "avx2") {
      TORCH_CHECK(avx2, "gradnoise: GRADNOISE_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
      return Isa::kAvx2;
    }
    if (want == "avx512") {
      TORCH_CHECK(avx512, "gradnoise: GRADNOISE_CPU_ISA=avx512 but this CPU lacks AVX-512");
      return Isa::kAvx512;
    }
    TORCH_CHECK(want.empty(), "gradnoise: GRADNOISE_CPU_ISA must be avx512, avx2 or generic, got '",
                want, "'");
  }
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kGeneric;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// fn(Avx512{}), fn(Avx2{}) or fn(Generic{}): entry-point types whose members
// are compiled for that instruction set.
template <typename Avx512, typename Avx2, typename Generic, typename Fn>
void with_isa(Fn&& fn) {
  switch (cpu_isa()) {
    case Isa::kAvx512: fn(Avx512{}); break;
    case Isa::kAvx2: fn(Avx2{}); break;
    default: fn(Generic{});
  }
}

}  // namespace gradnoise
