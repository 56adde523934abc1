#pragma once
/// \file backend/cuda/context.hpp
/// What the cuda backend runs with: a caller-given stream, a cuBLAS handle bound to it,
/// device buffers over cudaMalloc, row-major GEMMs through cuBLAS, and Thrust's CUDA policy on
/// that stream. Errors become smear exceptions naming the operation (and, for allocations, the
/// buffer and the bytes). Needs a CUDA compiler.

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <thrust/system/cuda/execution_policy.h>

#include <cstddef>
#include <utility>

#include "smear/backend/cuda/error.hpp"
#include "smear/error.hpp"

namespace smear::device {

namespace detail {

/// Throws cuda_error naming `op` and `call` when `status` is not cudaSuccess.
inline void check(cudaError_t status, const char* op, const char* call) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a sticky-free error so the next call starts clean
  throw cuda_error(smear::detail::message(op, ": ", call, " failed: ", cudaGetErrorName(status),
                                          " (", cudaGetErrorString(status), ")"));
}

/// Throws cuda_error naming `op` and `call` when `status` is not CUBLAS_STATUS_SUCCESS.
inline void check(cublasStatus_t status, const char* op, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw cuda_error(smear::detail::message(op, ": ", call, " failed: ", cublasGetStatusName(status),
                                          " (", cublasGetStatusString(status), ")"));
}

inline cublasOperation_t op_of(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

inline int as_int(std::size_t v, const char* op) {
  if (v > static_cast<std::size_t>(2147483647))
    throw value_error(smear::detail::message(op, ": dimension ", v, " exceeds cuBLAS's int range"));
  return static_cast<int>(v);
}

}  // namespace detail

/// A growable device buffer over cudaMalloc (never managed memory). `reserve(n, what)` keeps
/// the capacity, may drop the contents, and throws out_of_memory naming `what` and the bytes.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~device_buffer() { release(); }

  void reserve(std::size_t n, const char* what = "a buffer") {
    if (n <= n_) return;
    release();
    void* p = nullptr;
    const std::size_t bytes = n * sizeof(T);
    const cudaError_t status = cudaMalloc(&p, bytes);
    if (status == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      std::size_t free = 0, total = 0;
      (void)cudaMemGetInfo(&free, &total);
      throw out_of_memory(smear::detail::message("smear cuda backend: out of device memory allocating ",
                                                 bytes, " bytes for ", what, " (", free, " of ", total,
                                                 " bytes free)"),
                          bytes);
    }
    detail::check(status, "smear cuda backend: allocating device memory", "cudaMalloc");
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  T* data() noexcept { return p_; }
  const T* data() const noexcept { return p_; }
  std::size_t capacity() const noexcept { return n_; }

 private:
  void release() noexcept {
    if (p_) (void)cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// The stream, cuBLAS handle and Thrust policy the cuda backend enqueues its work with. Work
/// is asynchronous on the stream; `to_host` and `synchronize` wait for it.
class context {
 public:
  template <class T>
  using buffer = device_buffer<T>;

  /// Binds a new cuBLAS handle to `stream`. Throws value_error for the null (legacy default)
  /// stream, which would serialise with every other stream of the device: pass a stream of
  /// your own (cudaStreamCreate) or cudaStreamPerThread. Throws cuda_error for a stream that
  /// is not valid.
  explicit context(cudaStream_t stream) : stream_(stream) {
    constexpr const char* op = "smear cuda backend: binding a stream";
    if (stream == nullptr)
      throw value_error(smear::detail::message(
          op, ": the stream is null (the legacy default stream, which serialises with every "
              "other stream); pass a stream from cudaStreamCreate or cudaStreamPerThread"));
    const cudaError_t q = cudaStreamQuery(stream);
    if (q != cudaSuccess && q != cudaErrorNotReady) detail::check(q, op, "cudaStreamQuery");
    detail::check(cublasCreate(&handle_), op, "cublasCreate");
    const cublasStatus_t s = cublasSetStream(handle_, stream_);
    if (s != CUBLAS_STATUS_SUCCESS) {
      cublasDestroy(handle_);
      detail::check(s, op, "cublasSetStream");
    }
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() {
    if (handle_) (void)cublasDestroy(handle_);
  }

  cudaStream_t stream() const noexcept { return stream_; }
  cublasHandle_t cublas() const noexcept { return handle_; }
  auto policy() const { return thrust::cuda::par_nosync.on(stream_); }

  /// C = alpha·op(A)·op(B) + beta·C for row-major matrices: op(A) is [m, k], op(B) is [k, n],
  /// C is [m, n]; lda, ldb, ldc are the row strides of A, B, C as stored. (cuBLAS is
  /// column-major: it computes Cᵀ = op(B)ᵀ·op(A)ᵀ, which is the same memory.)
  template <class T>
  void gemm(bool ta, bool tb, std::size_t m, std::size_t n, std::size_t k, T alpha, const T* a,
            std::size_t lda, const T* b, std::size_t ldb, T beta, T* c, std::size_t ldc) const {
    constexpr const char* op = "smear cuda backend: gemm";
    if (m == 0 || n == 0) return;
    const int M = detail::as_int(m, op), Nn = detail::as_int(n, op), K = detail::as_int(k, op);
    const int la = detail::as_int(lda, op), lb = detail::as_int(ldb, op), lc = detail::as_int(ldc, op);
    if constexpr (sizeof(T) == 4)
      detail::check(cublasSgemm(handle_, detail::op_of(tb), detail::op_of(ta), Nn, M, K, &alpha, b, lb,
                                a, la, &beta, c, lc),
                    op, "cublasSgemm");
    else
      detail::check(cublasDgemm(handle_, detail::op_of(tb), detail::op_of(ta), Nn, M, K, &alpha, b, lb,
                                a, la, &beta, c, lc),
                    op, "cublasDgemm");
  }

  /// `count` GEMMs, the i-th on A + i·sa, B + i·sb, C + i·sc (one strided-batched cuBLAS call).
  template <class T>
  void gemm_batched(bool ta, bool tb, std::size_t m, std::size_t n, std::size_t k, T alpha,
                    const T* a, std::size_t lda, std::size_t sa, const T* b, std::size_t ldb,
                    std::size_t sb, T beta, T* c, std::size_t ldc, std::size_t sc,
                    std::size_t count) const {
    constexpr const char* op = "smear cuda backend: batched gemm";
    if (m == 0 || n == 0 || count == 0) return;
    const int M = detail::as_int(m, op), Nn = detail::as_int(n, op), K = detail::as_int(k, op);
    const int la = detail::as_int(lda, op), lb = detail::as_int(ldb, op), lc = detail::as_int(ldc, op);
    const int cnt = detail::as_int(count, op);
    const auto SA = static_cast<long long>(sa), SB = static_cast<long long>(sb),
               SC = static_cast<long long>(sc);
    if constexpr (sizeof(T) == 4)
      detail::check(cublasSgemmStridedBatched(handle_, detail::op_of(tb), detail::op_of(ta), Nn, M, K,
                                              &alpha, b, lb, SB, a, la, SA, &beta, c, lc, SC, cnt),
                    op, "cublasSgemmStridedBatched");
    else
      detail::check(cublasDgemmStridedBatched(handle_, detail::op_of(tb), detail::op_of(ta), Nn, M, K,
                                              &alpha, b, lb, SB, a, la, SA, &beta, c, lc, SC, cnt),
                    op, "cublasDgemmStridedBatched");
  }

  /// Asynchronous host → device copy on the stream (`src` is staged before return when it is
  /// pageable memory).
  template <class T>
  void to_device(T* dst, const T* src, std::size_t n, const char* op = "smear cuda backend: upload") const {
    if (n == 0) return;
    detail::check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, stream_), op,
                  "cudaMemcpyAsync (host to device)");
  }
  /// Device → host copy; waits for the stream.
  template <class T>
  void to_host(T* dst, const T* src, std::size_t n, const char* op = "smear cuda backend: download") const {
    if (n == 0) return;
    detail::check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, stream_), op,
                  "cudaMemcpyAsync (device to host)");
    synchronize(op);
  }
  /// Asynchronous device → device copy on the stream.
  template <class T>
  void copy(T* dst, const T* src, std::size_t n, const char* op = "smear cuda backend: copy") const {
    if (n == 0) return;
    detail::check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice, stream_), op,
                  "cudaMemcpyAsync (device to device)");
  }

  /// Throws value_error when `p` is not memory the device can read (plain host memory).
  void check_pointer(const void* p, const char* op, const char* what) const {
    cudaPointerAttributes attr{};
    detail::check(cudaPointerGetAttributes(&attr, p), op, "cudaPointerGetAttributes");
    if (attr.type == cudaMemoryTypeUnregistered)
      throw value_error(smear::detail::message(
          op, ": ", what, " points to host memory; the cuda backend reads and writes device memory "
          "(copy it with cudaMemcpy, or use smear::device::upload)"));
  }

  /// Waits for the stream; throws cuda_error naming `op` when earlier work failed.
  void synchronize(const char* op = "smear cuda backend: synchronize") const {
    detail::check(cudaStreamSynchronize(stream_), op, "cudaStreamSynchronize");
  }

 private:
  cudaStream_t stream_;
  cublasHandle_t handle_ = nullptr;
};

}  // namespace smear::device
