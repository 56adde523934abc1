#pragma once
/// \file backend/reference/kernels.hpp
/// The numeric kernels every expert and layer is written in, as plain loops. Each takes the
/// backend tag first; `backend::cpu` overloads the ones it speeds up.

#include <cstddef>
#include <span>

#include "smear/activation.hpp"
#include "smear/backend/tags.hpp"
#include "smear/tensor.hpp"

namespace smear::backend {

/// C = alpha · op(A) · op(B) + beta · C, with op(X) = Xᵀ when the flag is set. Shapes:
/// op(A) is [C.rows, K], op(B) is [K, C.cols]. beta = 0 ignores C's old contents (NaN too).
template <class T>
void gemm(reference, bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a,
          matrix_ref<const T> b, T beta, matrix_ref<T> c) {
  const std::size_t k = trans_a ? a.rows : a.cols;
  for (std::size_t i = 0; i < c.rows; ++i)
    for (std::size_t j = 0; j < c.cols; ++j) {
      T s = T(0);
      for (std::size_t l = 0; l < k; ++l)
        s += (trans_a ? a(l, i) : a(i, l)) * (trans_b ? b(j, l) : b(l, j));
      c(i, j) = alpha * s + (beta == T(0) ? T(0) : beta * c(i, j));
    }
}

/// pre.row(i) += bias; out(i, j) = act(pre(i, j)). `out` may alias `pre`.
template <class T>
void bias_activate(reference, activation act, matrix_ref<T> pre, std::span<const T> bias,
                   matrix_ref<T> out) {
  for (std::size_t i = 0; i < pre.rows; ++i)
    for (std::size_t j = 0; j < pre.cols; ++j) {
      if (!bias.empty()) pre(i, j) += bias[j];
      out(i, j) = smear::detail::activate(act, pre(i, j));
    }
}

/// c.row(i) += v for every row.
template <class T>
void add_to_rows(reference, matrix_ref<T> c, std::span<const T> v) {
  for (std::size_t i = 0; i < c.rows; ++i)
    for (std::size_t j = 0; j < c.cols; ++j) c(i, j) += v[j];
}

/// grad(i, j) *= act'(pre(i, j)).
template <class T>
void activation_backward(reference, activation act, matrix_ref<const T> pre, matrix_ref<T> grad) {
  for (std::size_t i = 0; i < grad.rows; ++i)
    for (std::size_t j = 0; j < grad.cols; ++j)
      grad(i, j) *= smear::detail::activate_derivative(act, pre(i, j));
}

/// out = Σ_i a.row(i) (column sums), overwriting `out`.
template <class T>
void column_sums(reference, matrix_ref<const T> a, std::span<T> out) {
  for (std::size_t j = 0; j < a.cols; ++j) out[j] = T(0);
  for (std::size_t i = 0; i < a.rows; ++i)
    for (std::size_t j = 0; j < a.cols; ++j) out[j] += a(i, j);
}

/// y += alpha · x
template <class T>
void axpy(reference, T alpha, std::span<const T> x, std::span<T> y) {
  for (std::size_t i = 0; i < x.size(); ++i) y[i] += alpha * x[i];
}

/// Runs f(i, thread) for i in [0, n); the reference backend runs them in order on thread 0.
template <class F>
void parallel_for(reference, std::size_t n, F&& f) {
  for (std::size_t i = 0; i < n; ++i) f(i, std::size_t{0});
}

/// How many threads parallel_for may use.
inline std::size_t max_threads(reference) { return 1; }

}  // namespace smear::backend
