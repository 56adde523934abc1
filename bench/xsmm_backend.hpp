#pragma once
/// \file bench/xsmm_backend.hpp
/// The benchmark's libxsmm anchor: a host backend that is smear's cpu backend except that the
/// per-example GEMMs (the adapters' and the router's: every dimension at most `small`) run
/// through libxsmm's JIT small-GEMM kernels; the merge and the bank GEMMs (one dimension P)
/// stay on the cpu backend. So a layer on this backend runs the same algorithm as one on cpu,
/// and the difference between the two rows is the small-GEMM kernels alone.
///
/// Include it before any other smear header: smear's templates call `backend::gemm<T>(be, ...)`
/// by qualified name, so the overload must be declared before they are defined.

#include <libxsmm.h>

#include <atomic>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "smear/backend/kernels.hpp"

namespace smear::backend {

/// smear's cpu backend with the small GEMMs through libxsmm.
struct xsmm : cpu {};

namespace detail {

/// The largest dimension a GEMM may have to go through libxsmm.
inline constexpr std::size_t xsmm_small = 1024;

struct xsmm_counts {
  std::atomic<std::size_t> jit{0}, fallback{0};  ///< GEMMs run by libxsmm, and small ones it could not take
};
inline xsmm_counts& xsmm_stats() {
  static xsmm_counts counts;
  return counts;
}

inline void xsmm_init() {
  static const bool done = [] {
    libxsmm_init();
    return true;
  }();
  (void)done;
}

template <class T>
auto xsmm_dispatch(int m, int n, int k, int lda, int ldb, int ldc, T alpha, T beta, int flags) {
  if constexpr (std::is_same_v<T, float>)
    return libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
  else
    return libxsmm_dmmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
}

}  // namespace detail

/// Row-major C = α·op(A)·op(B) + β·C is column-major Cᵀ = α·op(B)ᵀ·op(A)ᵀ + β·Cᵀ: libxsmm's
/// first operand is B, its second A. libxsmm 1.17 JITs a transposed second operand but not a
/// transposed first one, so for op(B) = Bᵀ, B is first transposed by libxsmm_otrans into a
/// per-thread scratch (what code written on libxsmm does). GEMMs it cannot take (α ≠ 1,
/// β ∉ {0, 1}) or that are not small run on the cpu backend, counted in xsmm_stats().
template <class T>
void gemm(xsmm be, bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a, matrix_ref<const T> b, T beta,
          matrix_ref<T> c) {
  const std::size_t depth = trans_a ? a.rows : a.cols;
  const bool small = c.rows <= detail::xsmm_small && c.cols <= detail::xsmm_small && depth <= detail::xsmm_small;
  if (small && c.rows > 0 && c.cols > 0 && depth > 0 && alpha == T(1) && (beta == T(0) || beta == T(1))) {
    detail::xsmm_init();
    const T* first = b.data;
    std::size_t ld_first = b.stride;
    if (trans_b) {  // B [n, k] → Bᵀ [k, n], row-major, in this thread's scratch
      thread_local std::vector<T> scratch;
      if (scratch.size() < depth * c.cols) scratch.resize(depth * c.cols);
      libxsmm_otrans(scratch.data(), b.data, sizeof(T), static_cast<libxsmm_blasint>(depth),
                     static_cast<libxsmm_blasint>(c.cols), static_cast<libxsmm_blasint>(b.stride),
                     static_cast<libxsmm_blasint>(c.cols));
      first = scratch.data();
      ld_first = c.cols;
    }
    const int flags = (trans_a ? LIBXSMM_GEMM_FLAG_TRANS_B : 0) | (beta == T(0) ? LIBXSMM_GEMM_FLAG_BETA_0 : 0);
    const auto kernel = detail::xsmm_dispatch<T>(static_cast<int>(c.cols), static_cast<int>(c.rows),
                                                 static_cast<int>(depth), static_cast<int>(ld_first),
                                                 static_cast<int>(a.stride), static_cast<int>(c.stride), alpha, beta,
                                                 flags);
    if (kernel != nullptr) {
      kernel(first, a.data, c.data);
      detail::xsmm_stats().jit.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    detail::xsmm_stats().fallback.fetch_add(1, std::memory_order_relaxed);
  }
  gemm<T>(static_cast<cpu>(be), trans_a, trans_b, alpha, a, b, beta, c);
}

}  // namespace smear::backend
