#pragma once
/// \file bench/anchor_backends.hpp
/// The benchmark's anchors: host backends that are smear's cpu backend except that the
/// per-example GEMMs (the adapters' and the router's: every dimension at most anchor_small) run
/// through another library's small-GEMM kernels; the merge and the bank GEMMs (one dimension P)
/// stay on the cpu backend. So a layer on such a backend runs the same algorithm as one on cpu,
/// and the difference between the rows is the small-GEMM kernels alone.
///
///   xsmm    libxsmm's JIT kernels (SMEAR_BENCH_XSMM; Debian libxsmm-dev)
///   onednn  oneDNN's dnnl_sgemm, float only, one thread per call (SMEAR_BENCH_ONEDNN; Debian
///           libdnnl-dev)
///
/// Include it before any other smear header: smear's templates call `backend::gemm<T>(be, ...)`
/// by qualified name, so the overloads must be declared before they are defined.

#ifdef SMEAR_BENCH_XSMM
#include <libxsmm.h>
#endif
#ifdef SMEAR_BENCH_ONEDNN
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#endif

#include <atomic>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "smear/backend/kernels.hpp"

namespace smear::backend {

namespace detail {

/// The largest dimension a GEMM may have to go through an anchor's library.
inline constexpr std::size_t anchor_small = 1024;

inline bool anchor_takes(std::size_t rows, std::size_t cols, std::size_t depth) noexcept {
  return rows > 0 && cols > 0 && depth > 0 && rows <= anchor_small && cols <= anchor_small && depth <= anchor_small;
}

struct anchor_counts {
  std::atomic<std::size_t> library{0}, fallback{0};  ///< small GEMMs the library ran, and could not take
};

}  // namespace detail

#ifdef SMEAR_BENCH_XSMM
/// smear's cpu backend with the small GEMMs through libxsmm.
struct xsmm : cpu {};

namespace detail {

inline anchor_counts& xsmm_stats() {
  static anchor_counts counts;
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
/// β ∉ {0, 1}) run on the cpu backend, counted in xsmm_stats(), as do the GEMMs that are not small.
template <class T>
void gemm(xsmm be, bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a, matrix_ref<const T> b, T beta,
          matrix_ref<T> c) {
  const std::size_t depth = trans_a ? a.rows : a.cols;
  if (detail::anchor_takes(c.rows, c.cols, depth) && alpha == T(1) && (beta == T(0) || beta == T(1))) {
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
      detail::xsmm_stats().library.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    detail::xsmm_stats().fallback.fetch_add(1, std::memory_order_relaxed);
  }
  gemm<T>(static_cast<cpu>(be), trans_a, trans_b, alpha, a, b, beta, c);
}
#endif  // SMEAR_BENCH_XSMM

#ifdef SMEAR_BENCH_ONEDNN
/// smear's cpu backend with the small float GEMMs through oneDNN's dnnl_sgemm.
struct onednn : cpu {};

namespace detail {

inline anchor_counts& onednn_stats() {
  static anchor_counts counts;
  return counts;
}

}  // namespace detail

/// Row-major, as dnnl_sgemm is. Each call runs on its calling thread (oneDNN's OpenMP team is
/// set to one thread per calling thread: the pool already spreads the examples); double, and
/// the large GEMMs, run on the cpu backend.
template <class T>
void gemm(onednn be, bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a, matrix_ref<const T> b, T beta,
          matrix_ref<T> c) {
  const std::size_t depth = trans_a ? a.rows : a.cols;
  if constexpr (std::is_same_v<T, float>) {
    if (detail::anchor_takes(c.rows, c.cols, depth)) {
      thread_local const bool one_thread = (omp_set_num_threads(1), true);
      (void)one_thread;
      const auto rc = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', static_cast<dnnl_dim_t>(c.rows),
                                 static_cast<dnnl_dim_t>(c.cols), static_cast<dnnl_dim_t>(depth), alpha, a.data,
                                 static_cast<dnnl_dim_t>(a.stride), b.data, static_cast<dnnl_dim_t>(b.stride), beta,
                                 c.data, static_cast<dnnl_dim_t>(c.stride));
      if (rc == dnnl_success) {
        detail::onednn_stats().library.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      detail::onednn_stats().fallback.fetch_add(1, std::memory_order_relaxed);
    }
  }
  gemm<T>(static_cast<cpu>(be), trans_a, trans_b, alpha, a, b, beta, c);
}
#endif  // SMEAR_BENCH_ONEDNN

}  // namespace smear::backend
