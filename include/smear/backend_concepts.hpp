#pragma once
/// \file backend_concepts.hpp
/// What smear requires of a backend, beside what concepts.hpp requires of an expert. Each
/// concept comes with a consteval check that names the first missing member in a sentence;
/// the layers assert it, so a backend that lacks something fails to compile with that
/// sentence rather than a page of template errors.
///
///   host_kernel_set<Backend, T>         the kernels smear::layer, the router and the experts
///                                       call on the host (a tag deriving from
///                                       backend::reference has them all);
///   execution_context<Ctx, T>           what the cuda layer's algorithm runs with: buffers,
///                                       row-major GEMMs, copies, a Thrust policy
///                                       (device::context on a GPU, device::host_context on
///                                       a CPU);
///   device_expert_kernel<D, Ctx, T>     an expert's forward and backward over the whole
///                                       padded batch in a context's memory
///                                       (smear/backend/cuda/experts.hpp).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "smear/activation.hpp"
#include "smear/backend/kernels.hpp"
#include "smear/tensor.hpp"

namespace smear {

namespace detail {
/// A task parallel_for accepts: f(i, thread). (A named type, not a lambda: some compilers'
/// front ends refuse lambdas inside requires-expressions.)
struct index_task {
  void operator()(std::size_t, std::size_t) const noexcept {}
};
}  // namespace detail

/// The host kernels, called as `backend::kernel<T>(be, ...)` (smear/backend/reference/
/// kernels.hpp documents each): gemm, bias_activate, add_to_rows, activation_backward,
/// column_sums, axpy, parallel_for and max_threads.
template <class Backend, class T>
concept host_kernel_set = requires(const Backend be, T a, bool t, activation act, matrix_ref<const T> cm,
                                   matrix_ref<T> m, std::span<const T> cs, std::span<T> s, std::size_t n) {
  backend::gemm<T>(be, t, t, a, cm, cm, a, m);
  backend::bias_activate<T>(be, act, m, cs, m);
  backend::add_to_rows<T>(be, m, cs);
  backend::activation_backward<T>(be, act, cm, m);
  backend::column_sums<T>(be, cm, s);
  backend::axpy<T>(be, a, cs, s);
  backend::parallel_for(be, n, detail::index_task{});
  { backend::max_threads(be) } -> std::convertible_to<std::size_t>;
};

/// An execution context of the cuda layer's algorithm, for element type T: `Ctx::buffer<V>`
/// (reserve(n, what), data(), capacity()) for T and std::int32_t; gemm and gemm_batched
/// (row-major, as device::context documents them); to_device, to_host and copy; check_pointer;
/// synchronize; and policy(), the Thrust execution policy the element-wise work runs on.
template <class Ctx, class T>
concept execution_context =
    requires(Ctx& c, const Ctx& cc, typename Ctx::template buffer<T>& bt,
             typename Ctx::template buffer<std::int32_t>& bi, T a, bool t, T* p, const T* cp, std::size_t n) {
      bt.reserve(n, "");
      { bt.data() } -> std::same_as<T*>;
      { bt.capacity() } -> std::convertible_to<std::size_t>;
      bi.reserve(n, "");
      { bi.data() } -> std::same_as<std::int32_t*>;
      cc.gemm(t, t, n, n, n, a, cp, n, cp, n, a, p, n);
      cc.gemm_batched(t, t, n, n, n, a, cp, n, n, cp, n, n, a, p, n, n, n);
      cc.to_device(p, cp, n, "");
      cc.to_host(p, cp, n, "");
      cc.copy(p, cp, n, "");
      cc.check_pointer(static_cast<const void*>(cp), "", "");
      cc.synchronize("");
      c.policy();
    };

/// An expert's kernels in a context's memory (the contract smear/backend/cuda/experts.hpp
/// states): saved_size(B, L), scratch_size(B, L), forward and backward over the padded batch.
template <class D, class Ctx, class T>
concept device_expert_kernel =
    requires(const D& d, Ctx& ctx, const T* cp, T* p, const std::int32_t* lengths, std::size_t n) {
      { d.saved_size(n, n) } -> std::convertible_to<std::size_t>;
      { d.scratch_size(n, n) } -> std::convertible_to<std::size_t>;
      d.forward(ctx, cp, n, cp, lengths, n, n, p, p);
      d.backward(ctx, cp, n, cp, lengths, n, n, cp, cp, p, p, p);
    };

namespace detail {

/// host_kernel_set, one kernel at a time.
template <class Backend, class T>
consteval bool diagnose_host_kernel_set() {
  static_assert(!std::is_same_v<Backend, backend::cuda>,
                "smear: smear::layer<Expert, N, smear::backend::cuda> is defined in <smear/cuda.hpp>, "
                "compiled by a CUDA compiler");
  if constexpr (std::is_same_v<Backend, backend::cuda>) {
    return false;
  } else {
    using m = matrix_ref<T>;
    using cm = matrix_ref<const T>;
    static_assert(requires(const Backend be, bool t, T a, cm x, m c) { backend::gemm<T>(be, t, t, a, x, x, a, c); },
                  "smear: the backend has no `gemm` kernel; derive its tag from smear::backend::reference or "
                  "overload smear::backend::gemm for it");
    static_assert(requires(const Backend be, activation act, m x, std::span<const T> v) {
      backend::bias_activate<T>(be, act, x, v, x);
    }, "smear: the backend has no `bias_activate` kernel; derive its tag from smear::backend::reference");
    static_assert(requires(const Backend be, m x, std::span<const T> v) { backend::add_to_rows<T>(be, x, v); },
                  "smear: the backend has no `add_to_rows` kernel; derive its tag from smear::backend::reference");
    static_assert(requires(const Backend be, activation act, cm x, m g) {
      backend::activation_backward<T>(be, act, x, g);
    }, "smear: the backend has no `activation_backward` kernel; derive its tag from smear::backend::reference");
    static_assert(requires(const Backend be, cm x, std::span<T> v) { backend::column_sums<T>(be, x, v); },
                  "smear: the backend has no `column_sums` kernel; derive its tag from smear::backend::reference");
    static_assert(requires(const Backend be, T a, std::span<const T> x, std::span<T> y) {
      backend::axpy<T>(be, a, x, y);
    }, "smear: the backend has no `axpy` kernel; derive its tag from smear::backend::reference");
    static_assert(requires(const Backend be, std::size_t n) {
      backend::parallel_for(be, n, detail::index_task{});
      { backend::max_threads(be) } -> std::convertible_to<std::size_t>;
    }, "smear: the backend has no `parallel_for` / `max_threads`; derive its tag from smear::backend::reference");
    return host_kernel_set<Backend, T>;
  }
}

/// execution_context, one member at a time.
template <class Ctx, class T>
consteval bool diagnose_execution_context() {
  static_assert(requires { typename Ctx::template buffer<T>; typename Ctx::template buffer<std::int32_t>; },
                "smear: an execution context must have a member template `buffer<V>` (reserve, data, capacity)");
  if constexpr (requires { typename Ctx::template buffer<T>; }) {
    static_assert(requires(typename Ctx::template buffer<T>& b, std::size_t n) {
      b.reserve(n, "");
      { b.data() } -> std::same_as<T*>;
      { b.capacity() } -> std::convertible_to<std::size_t>;
    }, "smear: an execution context's `buffer<V>` must have `reserve(n, what)`, `V* data()` and `capacity()`");
  }
  static_assert(requires(const Ctx& c, bool t, T a, T* p, const T* cp, std::size_t n) {
    c.gemm(t, t, n, n, n, a, cp, n, cp, n, a, p, n);
  }, "smear: an execution context must have `gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) const`");
  static_assert(requires(const Ctx& c, bool t, T a, T* p, const T* cp, std::size_t n) {
    c.gemm_batched(t, t, n, n, n, a, cp, n, n, cp, n, n, a, p, n, n, n);
  }, "smear: an execution context must have `gemm_batched(ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, "
     "c, ldc, sc, count) const`");
  static_assert(requires(const Ctx& c, T* p, const T* cp, std::size_t n) {
    c.to_device(p, cp, n, "");
    c.to_host(p, cp, n, "");
    c.copy(p, cp, n, "");
  }, "smear: an execution context must have `to_device`, `to_host` and `copy(dst, src, n, op) const`");
  static_assert(requires(const Ctx& c, const void* p) {
    c.check_pointer(p, "", "");
    c.synchronize("");
  }, "smear: an execution context must have `check_pointer(p, op, what) const` and `synchronize(op) const`");
  static_assert(requires(Ctx& c) { c.policy(); },
                "smear: an execution context must have `policy()`, the Thrust execution policy of its work");
  return execution_context<Ctx, T>;
}

/// device_expert_kernel, one member at a time.
template <class D, class Ctx, class T>
consteval bool diagnose_device_expert_kernel() {
  static_assert(requires(const D& d, std::size_t n) {
    { d.saved_size(n, n) } -> std::convertible_to<std::size_t>;
    { d.scratch_size(n, n) } -> std::convertible_to<std::size_t>;
  }, "smear: a device expert must have `saved_size(B, L) const` and `scratch_size(B, L) const`");
  static_assert(requires(const D& d, Ctx& ctx, const T* cp, T* p, const std::int32_t* lengths, std::size_t n) {
    d.forward(ctx, cp, n, cp, lengths, n, n, p, p);
  }, "smear: a device expert must have `forward(ctx, merged, ps, x, lengths, B, L, y, saved) const`");
  static_assert(requires(const D& d, Ctx& ctx, const T* cp, T* p, const std::int32_t* lengths, std::size_t n) {
    d.backward(ctx, cp, n, cp, lengths, n, n, cp, cp, p, p, p);
  }, "smear: a device expert must have `backward(ctx, merged, ps, x, lengths, B, L, saved, dy, dx, grads, "
     "scratch) const`");
  return device_expert_kernel<D, Ctx, T>;
}

}  // namespace detail
}  // namespace smear
