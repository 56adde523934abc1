#pragma once
/// \file backend/cpu/kernels.hpp
/// The cpu backend's kernels: GEMMs through Eigen maps over the caller's buffers (no copies),
/// element-wise loops through xsimd, the batch spread over OpenMP threads when enabled.

#include <cstddef>
#include <span>

#include <Eigen/Core>
#include <xsimd/xsimd.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "smear/backend/reference/kernels.hpp"

namespace smear::backend {
namespace detail {

template <class T>
using row_major = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using map = Eigen::Map<row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using const_map = Eigen::Map<const row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
map<T> eigen(matrix_ref<T> m) {
  return {m.data, static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols),
          Eigen::OuterStride<>(static_cast<Eigen::Index>(m.stride))};
}
template <class T>
const_map<T> eigen(matrix_ref<const T> m) {
  return {m.data, static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols),
          Eigen::OuterStride<>(static_cast<Eigen::Index>(m.stride))};
}

/// Applies the vector op `f(batch)` and the scalar op `g(x)` along one row of n values:
/// out[i] = f(in[i]) elementwise.
template <class T, class F, class G>
void transform(const T* in, T* out, std::size_t n, F&& f, G&& g) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  std::size_t i = 0;
  for (; i + w <= n; i += w) f(batch::load_unaligned(in + i)).store_unaligned(out + i);
  for (; i < n; ++i) out[i] = g(in[i]);
}

template <class T>
xsimd::batch<T> activate(activation act, const xsimd::batch<T>& x) {
  using batch = xsimd::batch<T>;
  switch (act) {
    case activation::silu: return x / (batch(T(1)) + xsimd::exp(-x));
    case activation::relu: return xsimd::max(x, batch(T(0)));
    case activation::gelu: {
      const batch u = T(smear::detail::gelu_k0) * (x + T(smear::detail::gelu_k1) * x * x * x);
      return T(0.5) * x * (batch(T(1)) + xsimd::tanh(u));
    }
    case activation::identity: return x;
  }
  return x;
}

template <class T>
xsimd::batch<T> activate_derivative(activation act, const xsimd::batch<T>& x) {
  using batch = xsimd::batch<T>;
  const batch one(T(1));
  switch (act) {
    case activation::silu: {
      const batch s = one / (one + xsimd::exp(-x));
      return s * (one + x * (one - s));
    }
    case activation::relu: return xsimd::select(x > batch(T(0)), one, batch(T(0)));
    case activation::gelu: {
      const batch u = T(smear::detail::gelu_k0) * (x + T(smear::detail::gelu_k1) * x * x * x);
      const batch t = xsimd::tanh(u);
      const batch du = T(smear::detail::gelu_k0) * (one + T(3 * smear::detail::gelu_k1) * x * x);
      return T(0.5) * (one + t) + T(0.5) * x * (one - t * t) * du;
    }
    case activation::identity: return one;
  }
  return one;
}

}  // namespace detail

template <class T>
void gemm(cpu, bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a, matrix_ref<const T> b,
          T beta, matrix_ref<T> c) {
  auto cm = detail::eigen(c);
  const auto am = detail::eigen(a);
  const auto bm = detail::eigen(b);
  auto run = [&](const auto& x, const auto& y) {
    if (beta == T(0)) {
      cm.noalias() = alpha * (x * y);
    } else {
      if (beta != T(1)) cm *= beta;
      cm.noalias() += alpha * (x * y);
    }
  };
  if (!trans_a && !trans_b) run(am, bm);
  else if (trans_a && !trans_b) run(am.transpose(), bm);
  else if (!trans_a && trans_b) run(am, bm.transpose());
  else run(am.transpose(), bm.transpose());
}

template <class T>
void bias_activate(cpu, activation act, matrix_ref<T> pre, std::span<const T> bias,
                   matrix_ref<T> out) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  for (std::size_t i = 0; i < pre.rows; ++i) {
    T* p = pre.data + i * pre.stride;
    T* o = out.data + i * out.stride;
    std::size_t j = 0;
    for (; j + w <= pre.cols; j += w) {
      batch x = batch::load_unaligned(p + j);
      if (!bias.empty()) x += batch::load_unaligned(bias.data() + j);
      x.store_unaligned(p + j);
      detail::activate(act, x).store_unaligned(o + j);
    }
    for (; j < pre.cols; ++j) {
      if (!bias.empty()) p[j] += bias[j];
      o[j] = smear::detail::activate(act, p[j]);
    }
  }
}

template <class T>
void add_to_rows(cpu, matrix_ref<T> c, std::span<const T> v) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  for (std::size_t i = 0; i < c.rows; ++i) {
    T* r = c.data + i * c.stride;
    std::size_t j = 0;
    for (; j + w <= c.cols; j += w)
      (batch::load_unaligned(r + j) + batch::load_unaligned(v.data() + j)).store_unaligned(r + j);
    for (; j < c.cols; ++j) r[j] += v[j];
  }
}

template <class T>
void activation_backward(cpu, activation act, matrix_ref<const T> pre, matrix_ref<T> grad) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  for (std::size_t i = 0; i < grad.rows; ++i) {
    const T* p = pre.data + i * pre.stride;
    T* g = grad.data + i * grad.stride;
    std::size_t j = 0;
    for (; j + w <= grad.cols; j += w)
      (batch::load_unaligned(g + j) * detail::activate_derivative(act, batch::load_unaligned(p + j)))
          .store_unaligned(g + j);
    for (; j < grad.cols; ++j) g[j] *= smear::detail::activate_derivative(act, p[j]);
  }
}

template <class T>
void column_sums(cpu, matrix_ref<const T> a, std::span<T> out) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  std::size_t j = 0;
  for (; j + w <= a.cols; j += w) {
    batch s(T(0));
    for (std::size_t i = 0; i < a.rows; ++i) s += batch::load_unaligned(a.data + i * a.stride + j);
    s.store_unaligned(out.data() + j);
  }
  for (; j < a.cols; ++j) {
    T s = T(0);
    for (std::size_t i = 0; i < a.rows; ++i) s += a(i, j);
    out[j] = s;
  }
}

template <class T>
void axpy(cpu, T alpha, std::span<const T> x, std::span<T> y) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  const batch a(alpha);
  std::size_t i = 0;
  for (; i + w <= x.size(); i += w)
    xsimd::fma(a, batch::load_unaligned(x.data() + i), batch::load_unaligned(y.data() + i))
        .store_unaligned(y.data() + i);
  for (; i < x.size(); ++i) y[i] += alpha * x[i];
}

/// Static schedule over OpenMP threads: for a fixed thread count the split, and so every
/// result, is deterministic.
template <class F>
void parallel_for(cpu, std::size_t n, F&& f) {
#ifdef _OPENMP
  if (n > 1 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
    const auto count = static_cast<long long>(n);
#pragma omp parallel for schedule(static)
    for (long long i = 0; i < count; ++i)
      f(static_cast<std::size_t>(i), static_cast<std::size_t>(omp_get_thread_num()));
    return;
  }
#endif
  for (std::size_t i = 0; i < n; ++i) f(i, std::size_t{0});
}

inline std::size_t max_threads(cpu) {
#ifdef _OPENMP
  return static_cast<std::size_t>(omp_get_max_threads());
#else
  return 1;
#endif
}

}  // namespace smear::backend
