#pragma once
/// \file backend/cuda/host_context.hpp
/// The cuda backend's execution context on a CPU: the same interface as device::context
/// (buffers, row-major GEMMs and strided-batched GEMMs, copies, a Thrust policy), with host
/// memory, plain-loop GEMMs and `thrust::cpp::par`. The cuda layer's algorithm instantiated
/// with it runs on any machine, which is how the tests check that algorithm without a GPU.
/// Needs only Thrust's headers (a host compiler with THRUST_DEVICE_SYSTEM_CPP suffices).

#include <thrust/system/cpp/execution_policy.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace smear::device {

/// Host twin of device::context; see the file comment.
class host_context {
 public:
  /// A growable host buffer; `reserve` keeps the capacity and may drop the contents.
  template <class T>
  class buffer {
   public:
    void reserve(std::size_t n, const char* = "") {
      if (v_.size() < n) v_.assign(n, T(0));
    }
    T* data() noexcept { return v_.data(); }
    const T* data() const noexcept { return v_.data(); }
    std::size_t capacity() const noexcept { return v_.size(); }

   private:
    std::vector<T> v_;
  };

  static auto policy() { return thrust::cpp::par; }

  /// C = alpha·op(A)·op(B) + beta·C for row-major matrices: op(A) is [m, k], op(B) is [k, n],
  /// C is [m, n]; lda, ldb, ldc are the row strides of A, B, C as stored.
  template <class T>
  void gemm(bool ta, bool tb, std::size_t m, std::size_t n, std::size_t k, T alpha, const T* a,
            std::size_t lda, const T* b, std::size_t ldb, T beta, T* c, std::size_t ldc) const {
    for (std::size_t i = 0; i < m; ++i)
      for (std::size_t j = 0; j < n; ++j) {
        T s = T(0);
        for (std::size_t l = 0; l < k; ++l)
          s += (ta ? a[l * lda + i] : a[i * lda + l]) * (tb ? b[j * ldb + l] : b[l * ldb + j]);
        c[i * ldc + j] = alpha * s + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
      }
  }

  /// `count` GEMMs, the i-th on A + i·sa, B + i·sb, C + i·sc.
  template <class T>
  void gemm_batched(bool ta, bool tb, std::size_t m, std::size_t n, std::size_t k, T alpha,
                    const T* a, std::size_t lda, std::size_t sa, const T* b, std::size_t ldb,
                    std::size_t sb, T beta, T* c, std::size_t ldc, std::size_t sc,
                    std::size_t count) const {
    for (std::size_t i = 0; i < count; ++i)
      gemm(ta, tb, m, n, k, alpha, a + i * sa, lda, b + i * sb, ldb, beta, c + i * sc, ldc);
  }

  template <class T>
  void to_device(T* dst, const T* src, std::size_t n, const char* = "") const {
    std::copy_n(src, n, dst);
  }
  template <class T>
  void to_host(T* dst, const T* src, std::size_t n, const char* = "") const {
    std::copy_n(src, n, dst);
  }
  template <class T>
  void copy(T* dst, const T* src, std::size_t n, const char* = "") const {
    std::copy_n(src, n, dst);
  }
  /// Every pointer is accessible here.
  void check_pointer(const void*, const char*, const char*) const {}
  void synchronize(const char* = "") const {}
};

}  // namespace smear::device
