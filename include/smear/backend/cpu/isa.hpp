#pragma once
/// \file backend/cpu/isa.hpp
/// Which instruction set the cpu backend's GEMM kernels use, chosen once at run time.
///
/// The kernels are compiled for the build's own flags (the baseline: SSE2 on x86-64 with the
/// compiler's defaults, AVX-512 with -march=native on such a machine) and, on x86-64 with GCC
/// or Clang, again for AVX2+FMA and for AVX-512 where the build's flags do not already reach
/// them (each in a region of the header compiled for that target). At the first GEMM the
/// widest one this CPU and its operating system support is selected; `SMEAR_CPU_ISA`
/// (baseline, avx2 or avx512) picks a narrower one, and select_isa() forces one (tests,
/// benchmarks). Define SMEAR_NO_CPU_DISPATCH to compile the baseline only.

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>

#include <xsimd/xsimd.hpp>

#include "smear/error.hpp"

#if !defined(SMEAR_NO_CPU_DISPATCH) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && !defined(__NVCOMPILER) &&   \
    !defined(__INTEL_COMPILER)
#if !defined(__AVX512F__)
#define SMEAR_CPU_DISPATCH_AVX512 1
#endif
#if !(defined(__AVX2__) && defined(__FMA__))
#define SMEAR_CPU_DISPATCH_AVX2 1
#endif
#endif

// Functions defined between SMEAR_TARGET_BEGIN("...") and SMEAR_TARGET_END are compiled for
// that target (GCC's target pragma, Clang's attribute push).
#if defined(__clang__)
#define SMEAR_PRAGMA(x) _Pragma(#x)
#define SMEAR_TARGET_BEGIN(isa) SMEAR_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define SMEAR_TARGET_END _Pragma("clang attribute pop")
#elif defined(__GNUC__)
#define SMEAR_PRAGMA(x) _Pragma(#x)
#define SMEAR_TARGET_BEGIN(isa) _Pragma("GCC push_options") SMEAR_PRAGMA(GCC target(isa))
#define SMEAR_TARGET_END _Pragma("GCC pop_options")
#endif

namespace smear::backend {

/// The instruction sets the cpu backend's GEMM kernels exist for, narrowest first.
enum class cpu_isa {
  baseline,  ///< the build's own flags (whatever xsimd's default architecture is)
  avx2,      ///< AVX2 + FMA, 256-bit vectors, 16 registers
  avx512,    ///< AVX-512F, 512-bit vectors, 32 registers
};

/// "baseline (sse2)", "avx2", "avx512": the baseline with xsimd's name for the build's flags.
inline std::string name(cpu_isa isa) {
  switch (isa) {
    case cpu_isa::avx2: return "avx2";
    case cpu_isa::avx512: return "avx512";
    case cpu_isa::baseline: break;
  }
  return std::string("baseline (") + xsimd::default_arch::name() + ")";
}

/// Whether this build has kernels for `isa` and this CPU runs them.
inline bool available(cpu_isa isa) noexcept {
  switch (isa) {
    case cpu_isa::baseline: return true;
    case cpu_isa::avx2:
#if defined(SMEAR_CPU_DISPATCH_AVX2)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case cpu_isa::avx512:
#if defined(SMEAR_CPU_DISPATCH_AVX512)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f");
#else
      return false;
#endif
  }
  return false;
}

namespace detail {

/// SMEAR_CPU_ISA when it is baseline, avx2 or avx512 and names an available set no wider than
/// `widest`; else (unset, empty, unknown) `widest`.
inline cpu_isa isa_from_environment(cpu_isa widest) {
  const char* text = std::getenv("SMEAR_CPU_ISA");
  if (text == nullptr) return widest;
  const std::string_view v(text);
  if (v != "avx512" && v != "avx2" && v != "baseline") return widest;  // empty or unknown: ignored
  const cpu_isa wanted = v == "avx512" ? cpu_isa::avx512 : v == "avx2" ? cpu_isa::avx2 : cpu_isa::baseline;
  return wanted <= widest && available(wanted) ? wanted : widest;
}

inline cpu_isa detect_isa() {
  cpu_isa widest = cpu_isa::baseline;
  if (available(cpu_isa::avx2)) widest = cpu_isa::avx2;
  if (available(cpu_isa::avx512)) widest = cpu_isa::avx512;
  return isa_from_environment(widest);
}

inline std::atomic<cpu_isa>& selected_isa_slot() {
  static std::atomic<cpu_isa> slot{detect_isa()};
  return slot;
}

}  // namespace detail

/// The instruction set the GEMM kernels use now.
inline cpu_isa selected_isa() { return detail::selected_isa_slot().load(std::memory_order_relaxed); }

/// Makes the GEMM kernels use `isa` from now on (for tests and benchmarks: not while another
/// thread runs smear). Throws value_error if this build has no kernels for it or the CPU
/// cannot run them.
inline void select_isa(cpu_isa isa) {
  if (!available(isa))
    throw value_error("smear::backend::select_isa: " + name(isa) +
                      " is not available (not compiled into this build, or not supported by this CPU)");
  detail::selected_isa_slot().store(isa, std::memory_order_relaxed);
}

/// e.g. "cpu kernels: avx512 (available: avx512, avx2, baseline (sse2))".
inline std::string cpu_kernels_report() {
  std::string out = "cpu kernels: " + name(selected_isa()) + " (available:";
  const char* sep = " ";
  for (cpu_isa isa : {cpu_isa::avx512, cpu_isa::avx2, cpu_isa::baseline})
    if (available(isa)) out += sep + name(isa), sep = ", ";
  return out + ")";
}

}  // namespace smear::backend
