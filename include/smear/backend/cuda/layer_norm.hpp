#pragma once
/// \file backend/cuda/layer_norm.hpp
/// The element-wise passes of the cuda backend's LayerNorm over the rows of a [rows, d] matrix
/// (the router's pooled inputs, and with normalize_weights its weight rows); the row means
/// between them come from GEMMs with a ones vector (cuda/device_router.hpp), so every step is
/// parallel. Conventions as in elementwise.hpp.

#include <cstddef>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/host_device.hpp"

namespace smear::device::detail {

template <class T>
struct center_fn {
  const T* h;
  const T* mean;
  T* centered;
  T* squares;
  std::size_t d;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const T v = h[i] - mean[i / d];
    centered[i] = v;
    squares[i] = v * v;
  }
};

/// centered = h − mean_b, squares = centered², both [B, d]: the LayerNorm's first element-wise
/// pass (the row means come from a GEMM with a ones vector, so every step is parallel).
template <class T, class Policy>
void center_rows(Policy&& policy, const T* h, const T* mean, std::size_t B, std::size_t d, T* centered,
                 T* squares) {
  for_each_index(policy, B * d, center_fn<T>{h, mean, centered, squares, d});
}

template <class T>
struct normalize_fn {
  const T* centered;
  const T* var;
  const T* gain;
  const T* shift;
  T* normed;
  T* features;
  T* rstd;
  std::size_t d;
  T eps;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t b = i / d, j = i % d;
    const T r = T(1) / smear::detail::sqrt_of(var[b] + eps);
    const T n = centered[i] * r;
    normed[i] = n;
    features[i] = n * gain[j] + shift[j];
    if (j == 0) rstd[b] = r;
  }
};

/// normed = centered·rstd_b with rstd_b = 1/√(var_b + eps), features = normed ⊙ gain + shift.
template <class T, class Policy>
void normalize_rows(Policy&& policy, const T* centered, const T* var, const T* gain, const T* shift,
                    std::size_t B, std::size_t d, T eps, T* normed, T* features, T* rstd) {
  for_each_index(policy, B * d, normalize_fn<T>{centered, var, gain, shift, normed, features, rstd, d, eps});
}

template <class T>
struct ln_grad_prepare_fn {
  T* df;
  const T* gain;
  const T* normed;
  T* dn_n;
  std::size_t d;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const T v = df[i] * gain[i % d];
    df[i] = v;
    dn_n[i] = v * normed[i];
  }
};

/// LayerNorm backward, first pass: df ← ∂ℓ/∂n = df ⊙ gain, dn_n = ∂ℓ/∂n ⊙ normed.
template <class T, class Policy>
void layer_norm_grad_prepare(Policy&& policy, T* df, const T* gain, const T* normed, std::size_t B,
                             std::size_t d, T* dn_n) {
  for_each_index(policy, B * d, ln_grad_prepare_fn<T>{df, gain, normed, dn_n, d});
}

template <class T>
struct ln_grad_finish_fn {
  T* dn;
  const T* normed;
  const T* rstd;
  const T* mean_dn;
  const T* mean_dn_n;
  std::size_t d;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t b = i / d;
    dn[i] = rstd[b] * (dn[i] - mean_dn[b] - normed[i] * mean_dn_n[b]);
  }
};

/// LayerNorm backward, last pass: dn ← ∂ℓ/∂h = rstd·(dn − mean(dn) − normed·mean(dn ⊙ normed)).
template <class T, class Policy>
void layer_norm_grad_finish(Policy&& policy, T* dn, const T* normed, const T* rstd, const T* mean_dn,
                            const T* mean_dn_n, std::size_t B, std::size_t d) {
  for_each_index(policy, B * d, ln_grad_finish_fn<T>{dn, normed, rstd, mean_dn, mean_dn_n, d});
}

}  // namespace smear::device::detail
