#pragma once
/// \file backend/cpu/direct_gemm.hpp
/// A GEMM that reads its operands where they are, without packing them: register tiles of
/// R rows × C SIMD batches of C, the depth loop broadcasting one value of op(A) and loading
/// C batches of a row of B per step, and C written once at the end (no zero-fill first).
///
/// It is for the shapes SMEAR runs: the per-example products of an expert (128 × 768 × 64 and
/// its transposes), where packing both operands costs as much as a third of Eigen's time, and
/// the merge and bank products of depth N or B over very long rows. Columns are blocked so the
/// part of B a block reads stays in L2; rows are the inner loop, so B is read from memory once.

#include <algorithm>
#include <cstddef>

#include <Eigen/Core>
#include <xsimd/xsimd.hpp>

#include "smear/backend/cpu/isa.hpp"
#if defined(SMEAR_CPU_DISPATCH_AVX2) || defined(SMEAR_CPU_DISPATCH_AVX512)
#include <immintrin.h>
#endif

/// Full unrolling of the register-tile loops, which GCC does not do by itself at -O2.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && !defined(__NVCOMPILER)
#define SMEAR_UNROLL _Pragma("GCC unroll 16")
#elif defined(__clang__)
#define SMEAR_UNROLL _Pragma("unroll")
#else
#define SMEAR_UNROLL
#endif
#if defined(__GNUC__)
#define SMEAR_PREFETCH(address) __builtin_prefetch(address)
#else
#define SMEAR_PREFETCH(address)
#endif

namespace smear::backend::detail::direct {

/// Bytes of B one column block may span: it is read once from memory, then from L2 for
/// every tile of rows.
inline constexpr std::size_t block_bytes = std::size_t{256} << 10;

/// The kernels for the build's own flags, over xsimd's default batch.
namespace baseline {
template <class T>
struct simd {
  using batch = xsimd::batch<T>;
  static constexpr std::size_t lanes = batch::size;
  static batch set1(T v) noexcept { return batch(v); }
  static batch load(const T* p) noexcept { return batch::load_unaligned(p); }
  static void store(T* p, const batch& v) noexcept { v.store_unaligned(p); }
  static batch mul(const batch& a, const batch& b) noexcept { return a * b; }
  static batch fma(const batch& a, const batch& b, const batch& c) noexcept { return xsimd::fma(a, b, c); }
  /// The first n < lanes values (the rest 0), and the store of the first n: masked where the
  /// build's vectors are AVX-512 or AVX2 ones, through a copy otherwise.
  static batch load_partial(const T* p, std::size_t n) noexcept {
#if XSIMD_WITH_AVX512F
    if constexpr (sizeof(batch) == 64) {
      if constexpr (sizeof(T) == 4) return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
      else return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
    }
#endif
#if XSIMD_WITH_AVX2
    if constexpr (sizeof(batch) == 32) {
      if constexpr (sizeof(T) == 4) return _mm256_maskload_ps(p, avx2_mask(n));
      else return _mm256_maskload_pd(p, avx2_mask(n));
    }
#endif
    alignas(64) T part[lanes] = {};
    std::copy_n(p, n, part);
    return batch::load_aligned(part);
  }
  static void store_partial(T* p, const batch& v, std::size_t n) noexcept {
#if XSIMD_WITH_AVX512F
    if constexpr (sizeof(batch) == 64) {
      if constexpr (sizeof(T) == 4) return _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
      else return _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), v);
    }
#endif
#if XSIMD_WITH_AVX2
    if constexpr (sizeof(batch) == 32) {
      if constexpr (sizeof(T) == 4) return _mm256_maskstore_ps(p, avx2_mask(n), v);
      else return _mm256_maskstore_pd(p, avx2_mask(n), v);
    }
#endif
    alignas(64) T part[lanes];
    v.store_aligned(part);
    std::copy_n(part, n, p);
  }
#if XSIMD_WITH_AVX2
  /// Lanes [0, n) of a 256-bit vector of T set.
  static __m256i avx2_mask(std::size_t n) noexcept {
    if constexpr (sizeof(T) == 4)
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    else
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(static_cast<long long>(n)), _mm256_setr_epi64x(0, 1, 2, 3));
  }
#endif
};
#include "smear/backend/cpu/direct_gemm.inl"
}  // namespace baseline

#if defined(SMEAR_CPU_DISPATCH_AVX2)
SMEAR_TARGET_BEGIN("avx2,fma")
/// The kernels again, compiled for AVX2 + FMA.
namespace avx2 {
template <class T>
struct simd;
template <>
struct simd<float> {
  using batch = __m256;
  static constexpr std::size_t lanes = 8;
  static batch set1(float v) noexcept { return _mm256_set1_ps(v); }
  static batch load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static void store(float* p, batch v) noexcept { _mm256_storeu_ps(p, v); }
  static batch mul(batch a, batch b) noexcept { return _mm256_mul_ps(a, b); }
  static batch fma(batch a, batch b, batch c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static __m256i mask(std::size_t n) noexcept {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static batch load_partial(const float* p, std::size_t n) noexcept { return _mm256_maskload_ps(p, mask(n)); }
  static void store_partial(float* p, batch v, std::size_t n) noexcept { _mm256_maskstore_ps(p, mask(n), v); }
};
template <>
struct simd<double> {
  using batch = __m256d;
  static constexpr std::size_t lanes = 4;
  static batch set1(double v) noexcept { return _mm256_set1_pd(v); }
  static batch load(const double* p) noexcept { return _mm256_loadu_pd(p); }
  static void store(double* p, batch v) noexcept { _mm256_storeu_pd(p, v); }
  static batch mul(batch a, batch b) noexcept { return _mm256_mul_pd(a, b); }
  static batch fma(batch a, batch b, batch c) noexcept { return _mm256_fmadd_pd(a, b, c); }
  static __m256i mask(std::size_t n) noexcept {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(static_cast<long long>(n)), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static batch load_partial(const double* p, std::size_t n) noexcept { return _mm256_maskload_pd(p, mask(n)); }
  static void store_partial(double* p, batch v, std::size_t n) noexcept { _mm256_maskstore_pd(p, mask(n), v); }
};
#include "smear/backend/cpu/direct_gemm.inl"
}  // namespace avx2
SMEAR_TARGET_END
#endif

#if defined(SMEAR_CPU_DISPATCH_AVX512)
SMEAR_TARGET_BEGIN("avx512f,avx2,fma")
/// The kernels again, compiled for AVX-512F.
namespace avx512 {
template <class T>
struct simd;
template <>
struct simd<float> {
  using batch = __m512;
  static constexpr std::size_t lanes = 16;
  static batch set1(float v) noexcept { return _mm512_set1_ps(v); }
  static batch load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static void store(float* p, batch v) noexcept { _mm512_storeu_ps(p, v); }
  static batch mul(batch a, batch b) noexcept { return _mm512_mul_ps(a, b); }
  static batch fma(batch a, batch b, batch c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static __mmask16 mask(std::size_t n) noexcept { return static_cast<__mmask16>((1u << n) - 1); }
  static batch load_partial(const float* p, std::size_t n) noexcept { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_partial(float* p, batch v, std::size_t n) noexcept { _mm512_mask_storeu_ps(p, mask(n), v); }
};
template <>
struct simd<double> {
  using batch = __m512d;
  static constexpr std::size_t lanes = 8;
  static batch set1(double v) noexcept { return _mm512_set1_pd(v); }
  static batch load(const double* p) noexcept { return _mm512_loadu_pd(p); }
  static void store(double* p, batch v) noexcept { _mm512_storeu_pd(p, v); }
  static batch mul(batch a, batch b) noexcept { return _mm512_mul_pd(a, b); }
  static batch fma(batch a, batch b, batch c) noexcept { return _mm512_fmadd_pd(a, b, c); }
  static __mmask8 mask(std::size_t n) noexcept { return static_cast<__mmask8>((1u << n) - 1); }
  static batch load_partial(const double* p, std::size_t n) noexcept { return _mm512_maskz_loadu_pd(mask(n), p); }
  static void store_partial(double* p, batch v, std::size_t n) noexcept { _mm512_mask_storeu_pd(p, mask(n), v); }
};
#include "smear/backend/cpu/direct_gemm.inl"
}  // namespace avx512
SMEAR_TARGET_END
#endif

/// The SIMD width of the selected kernels for T (gemm() takes any width of C: a last partial
/// batch through masked loads and stores).
template <class T>
std::size_t lanes() noexcept {
  switch (selected_isa()) {
#if defined(SMEAR_CPU_DISPATCH_AVX512)
    case cpu_isa::avx512: return avx512::lanes<T>;
#endif
#if defined(SMEAR_CPU_DISPATCH_AVX2)
    case cpu_isa::avx2: return avx2::lanes<T>;
#endif
    default: return baseline::lanes<T>;
  }
}

/// C = alpha · op(A) · B + beta · C (see direct_gemm.inl) with the selected kernels.
template <class T, bool TransA>
void gemm(std::size_t rows, std::size_t cols, std::size_t depth, const T* a, std::size_t lda, const T* b,
          std::size_t ldb, T* c, std::size_t ldc, T alpha, T beta) {
  switch (selected_isa()) {
#if defined(SMEAR_CPU_DISPATCH_AVX512)
    case cpu_isa::avx512: return avx512::gemm<T, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
#endif
#if defined(SMEAR_CPU_DISPATCH_AVX2)
    case cpu_isa::avx2: return avx2::gemm<T, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
#endif
    default: return baseline::gemm<T, TransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
  }
}

/// C = alpha · A · Bᵀ + beta · C as dot products (see direct_gemm.inl) with the selected kernels.
template <class T>
void gemm_nt(std::size_t rows, std::size_t cols, std::size_t depth, const T* a, std::size_t lda, const T* b,
             std::size_t ldb, T* c, std::size_t ldc, T alpha, T beta) {
  switch (selected_isa()) {
#if defined(SMEAR_CPU_DISPATCH_AVX512)
    case cpu_isa::avx512: return avx512::gemm_nt<T>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
#endif
#if defined(SMEAR_CPU_DISPATCH_AVX2)
    case cpu_isa::avx2: return avx2::gemm_nt<T>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
#endif
    default: return baseline::gemm_nt<T>(rows, cols, depth, a, lda, b, ldb, c, ldc, alpha, beta);
  }
}

/// dst[cols × rows] = srcᵀ for a row-major src[rows × cols] (dst's stride is rows): square
/// blocks of one SIMD packet per row, transposed in registers by Eigen's ptranspose.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // Eigen's packet types as template arguments
#if !defined(__clang__)
// GCC 12 warns about _mm512_undefined_ps() inside its own AVX-512 shuffles (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif
template <class T>
void transpose(const T* src, std::size_t rows, std::size_t cols, std::size_t lds, T* dst) {
  namespace ei = Eigen::internal;
  using packet = typename ei::packet_traits<T>::type;
  constexpr std::size_t w = ei::unpacket_traits<packet>::size;
  std::size_t i0 = 0;
  if constexpr (w > 1) {
    for (; i0 + w <= rows; i0 += w) {
      std::size_t j0 = 0;
      for (; j0 + w <= cols; j0 += w) {
        ei::PacketBlock<packet, static_cast<int>(w)> block;
        for (std::size_t r = 0; r < w; ++r) block.packet[r] = ei::ploadu<packet>(src + (i0 + r) * lds + j0);
        ei::ptranspose(block);
        for (std::size_t r = 0; r < w; ++r) ei::pstoreu(dst + (j0 + r) * rows + i0, block.packet[r]);
      }
      for (; j0 < cols; ++j0)
        for (std::size_t r = 0; r < w; ++r) dst[j0 * rows + i0 + r] = src[(i0 + r) * lds + j0];
    }
  }
  for (; i0 < rows; ++i0)
    for (std::size_t j = 0; j < cols; ++j) dst[j * rows + i0] = src[i0 * lds + j];
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace smear::backend::detail::direct

#undef SMEAR_UNROLL
#undef SMEAR_PREFETCH
