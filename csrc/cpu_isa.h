// The x86 vector ISA of the CPU kernels of jdm_fast._C (GroupNorm+SiLU, counter_uniform): the best
// the CPU reports, or a lower one named by JDM_FAST_CPU_ISA=avx512|avx2|baseline, read once at the
// first kernel call. The override lets an AVX-512 machine run, test and time the AVX2 and baseline
// builds of the kernels (tests/test_cpu_isa.py runs each). No torch headers beyond c10's
// checks; not included by nvcc-compiled code.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JDM_X86_DISPATCH 1
#endif

namespace jdm_fast {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

// What the CPU supports: AVX-512 F/BW/VL, else AVX2 + FMA, else the x86-64 baseline (SSE2).
inline Isa detected_isa() {
#ifdef JDM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The ISA the kernels run: a bad JDM_FAST_CPU_ISA raises ValueError at every kernel call.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa best = detected_isa();
    const char* env = std::getenv("JDM_FAST_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    const std::string want(env);
    Isa chosen = Isa::kBaseline;
    if (want == "avx512") {
      chosen = Isa::kAvx512;
    } else if (want == "avx2") {
      chosen = Isa::kAvx2;
    } else {
      TORCH_CHECK_VALUE(want == "baseline", "JDM_FAST_CPU_ISA must be avx512, avx2 or baseline, got '", want, "'");
    }
    TORCH_CHECK_VALUE(static_cast<int>(chosen) <= static_cast<int>(best), "JDM_FAST_CPU_ISA=", want,
                      ": this CPU supports at most ", isa_name(best));
    return chosen;
  }();
  return isa;
}

}  // namespace jdm_fast
