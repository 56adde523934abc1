#pragma once
/// \file backend/cuda/elementwise.hpp
/// The cuda backend's element-wise work (pooling, softmax, bias, activations, masks, column
/// sums; the LayerNorm's passes are in layer_norm.hpp) as Thrust `for_each_n` over index ranges with small functors.
///
/// Every function takes a Thrust execution policy first and raw pointers into the policy's
/// memory: on a GPU `thrust::cuda::par_nosync.on(stream)` and device pointers, on a CPU
/// `thrust::cpp::par` and host pointers. This header needs only Thrust, so it also builds
/// with a host compiler under `THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP` (that is how
/// the tests exercise it without a GPU).
///
/// Layouts: token tensors are row-major [B, L, c] with example b's first `lengths[b]` rows
/// valid (`lengths` may be null: every row valid); parameter rows are [B, P] with a tensor at
/// a given offset inside each row.

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <math.h>

#include "smear/activation.hpp"
#include "smear/host_device.hpp"

namespace smear::device::detail {

SMEAR_HOST_DEVICE inline float exp_(float x) { return ::expf(x); }
SMEAR_HOST_DEVICE inline double exp_(double x) { return ::exp(x); }
SMEAR_HOST_DEVICE inline float tanh_(float x) { return ::tanhf(x); }
SMEAR_HOST_DEVICE inline double tanh_(double x) { return ::tanh(x); }

/// act(x), the same formulas as smear::detail::activate.
template <class T>
SMEAR_HOST_DEVICE T activate(activation a, T x) {
  switch (a) {
    case activation::silu: return x / (T(1) + exp_(-x));
    case activation::relu: return x > T(0) ? x : T(0);
    case activation::gelu: {
      const T u = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + tanh_(u));
    }
    case activation::identity: return x;
  }
  return x;
}

/// act'(x), the same formulas as smear::detail::activate_derivative.
template <class T>
SMEAR_HOST_DEVICE T activate_derivative(activation a, T x) {
  switch (a) {
    case activation::silu: {
      const T s = T(1) / (T(1) + exp_(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case activation::relu: return x > T(0) ? T(1) : T(0);
    case activation::gelu: {
      const T u = T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
      const T t = tanh_(u);
      const T du = T(0.7978845608028654) * (T(1) + T(3 * 0.044715) * x * x);
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
    }
    case activation::identity: return T(1);
  }
  return T(1);
}

/// Valid rows of example b.
SMEAR_HOST_DEVICE inline std::size_t rows_of(const std::int32_t* lengths, std::size_t b,
                                             std::size_t length) {
  return lengths == nullptr ? length : static_cast<std::size_t>(lengths[b]);
}

template <class Policy, class F>
void for_each_index(Policy&& policy, std::size_t n, F f) {
  if (n == 0) return;
  thrust::for_each_n(policy, thrust::counting_iterator<std::size_t>(0), n, f);
}

// ---- router ---------------------------------------------------------------------------------

template <class T>
struct pool_fn {
  const T* x;
  const std::int32_t* lengths;
  T* h;
  std::size_t L, d;
  bool all_rows;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t b = i / d, j = i % d;
    const std::size_t rows = all_rows ? L : rows_of(lengths, b, L);
    T s = T(0);
    for (std::size_t t = 0; t < rows; ++t) s += x[(b * L + t) * d + j];
    h[i] = rows == 0 ? T(0) : s * (T(1) / static_cast<T>(rows));  // a segment past its example's end
  }
};

/// h[b] = mean of x[b]'s valid rows (all L rows when `all_rows`; 0 without any): [B, d].
template <class T, class Policy>
void pool(Policy&& policy, const T* x, const std::int32_t* lengths, std::size_t B, std::size_t L,
          std::size_t d, bool all_rows, T* h) {
  for_each_index(policy, B * d, pool_fn<T>{x, lengths, h, L, d, all_rows});
}

template <class T>
struct softmax_fn {
  T* z;
  const T* bias;
  T* keep;
  T* soft;
  T* used;
  T* kept;
  std::size_t N;
  T inv_t;
  SMEAR_HOST_DEVICE void operator()(std::size_t b) const {
    T* zb = z + b * N;
    T* pb = soft + b * N;
    T* ub = used + b * N;
    T* kb = keep + b * N;
    T zmax = (zb[0] + (bias ? bias[0] : T(0))) * inv_t;
    for (std::size_t e = 0; e < N; ++e) {
      if (bias) zb[e] += bias[e];
      zmax = zb[e] * inv_t > zmax ? zb[e] * inv_t : zmax;
    }
    T sum = 0;
    for (std::size_t e = 0; e < N; ++e) sum += (pb[e] = exp_(zb[e] * inv_t - zmax));
    T k = 0;
    for (std::size_t e = 0; e < N; ++e) {
      pb[e] /= sum;
      k += kb[e] * pb[e];
    }
    if (!(k > T(0))) {  // every expert dropped: keep them all
      for (std::size_t e = 0; e < N; ++e) kb[e] = T(1);
      k = T(1);
    }
    kept[b] = k;
    for (std::size_t e = 0; e < N; ++e) ub[e] = kb[e] * pb[e] / k;
  }
};

/// Per row b: z += bias (when not null); soft = softmax(z·inv_t); used = keep ⊙ soft / ⟨keep, soft⟩ (all kept
/// when that is 0, and then `keep`'s row becomes all ones); kept[b] = the normaliser. `keep`
/// is a 0/1 mask [B, N].
template <class T, class Policy>
void softmax_dropout(Policy&& policy, T* z, const T* bias, T* keep, std::size_t B,
                     std::size_t N, T inv_t, T* soft, T* used, T* kept) {
  for_each_index(policy, B, softmax_fn<T>{z, bias, keep, soft, used, kept, N, inv_t});
}

template <class T>
struct softmax_backward_fn {
  const T* g;
  const T* soft;
  const T* used;
  const T* keep;
  const T* kept;
  T* dz;
  std::size_t N;
  T inv_t;
  SMEAR_HOST_DEVICE void operator()(std::size_t b) const {
    const T* gb = g + b * N;
    const T* pb = soft + b * N;
    const T* ub = used + b * N;
    const T* kb = keep + b * N;
    T gu = 0;
    for (std::size_t e = 0; e < N; ++e) gu += gb[e] * ub[e];
    T gp = 0;
    for (std::size_t e = 0; e < N; ++e) gp += kb[e] / kept[b] * (gb[e] - gu) * pb[e];
    for (std::size_t e = 0; e < N; ++e)
      dz[b * N + e] = pb[e] * (kb[e] / kept[b] * (gb[e] - gu) - gp) * inv_t;
  }
};

/// ∂ℓ/∂z [B, N] from ∂ℓ/∂used = g, through the dropout renormalisation and softmax(z·inv_t).
template <class T, class Policy>
void softmax_dropout_backward(Policy&& policy, const T* g, const T* soft, const T* used,
                              const T* keep, const T* kept, std::size_t B, std::size_t N, T inv_t,
                              T* dz) {
  for_each_index(policy, B, softmax_backward_fn<T>{g, soft, used, keep, kept, dz, N, inv_t});
}

template <class T>
struct column_sums_fn {
  const T* a;
  const T* weight;  // optional second factor: Σ_b a(b, j)·weight(b, j)
  T* out;
  std::size_t rows, cols;
  SMEAR_HOST_DEVICE void operator()(std::size_t j) const {
    T s = 0;
    for (std::size_t i = 0; i < rows; ++i)
      s += weight ? a[i * cols + j] * weight[i * cols + j] : a[i * cols + j];
    out[j] += s;
  }
};

/// out[j] += Σ_i a(i, j) (· w(i, j) when `w` is not null), a and w [rows, cols].
template <class T, class Policy>
void add_column_sums(Policy&& policy, const T* a, const T* w, std::size_t rows, std::size_t cols,
                     T* out) {
  for_each_index(policy, cols, column_sums_fn<T>{a, w, out, rows, cols});
}

template <class T>
struct spread_fn {
  const T* dh;
  const std::int32_t* lengths;
  T* dx;
  std::size_t L, d;
  bool all_rows;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t j = i % d, t = (i / d) % L, b = i / (d * L);
    const std::size_t rows = all_rows ? L : rows_of(lengths, b, L);
    if (t < rows) dx[i] += dh[b * d + j] / static_cast<T>(rows);
  }
};

/// dx[b, t] += dh[b] / rows_b on the rows the pooling read (the valid ones, or all with
/// `all_rows`).
template <class T, class Policy>
void spread_pooled(Policy&& policy, const T* dh, const std::int32_t* lengths, std::size_t B,
                   std::size_t L, std::size_t d, bool all_rows, T* dx) {
  for_each_index(policy, B * L * d, spread_fn<T>{dh, lengths, dx, L, d, all_rows});
}

template <class T>
struct shift_units_fn {
  const T* pooled;
  const T* prior;
  T* out;
  std::size_t S, d;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t r = i / d, j = i % d;
    out[i] = r % S == 0 ? prior[j] : pooled[i - d];
  }
};

/// Causal segment routing: unit r's router input ([U, d]) is the pooled tokens of unit r − 1,
/// or `prior` [d] for each example's first unit (r a multiple of S).
template <class T, class Policy>
void shift_units(Policy&& policy, const T* pooled, const T* prior, std::size_t U, std::size_t S, std::size_t d,
                 T* out) {
  for_each_index(policy, U * d, shift_units_fn<T>{pooled, prior, out, S, d});
}

template <class T>
struct unshift_units_fn {
  const T* dh;
  T* out;
  std::size_t S, d;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t r = i / d;
    out[i] = r % S == S - 1 ? T(0) : dh[i + d];
  }
};

template <class T>
struct prior_grad_fn {
  const T* dh;
  T* grad;
  std::size_t U, S, d;
  SMEAR_HOST_DEVICE void operator()(std::size_t j) const {
    T s = T(0);
    for (std::size_t r = 0; r < U; r += S) s += dh[r * d + j];
    grad[j] += s;
  }
};

/// shift_units' backward: out[r] = dh[r + 1] within an example (0 for its last unit), and
/// the first units' dh summed into `prior_grad` [d].
template <class T, class Policy>
void unshift_units(Policy&& policy, const T* dh, std::size_t U, std::size_t S, std::size_t d, T* out, T* prior_grad) {
  for_each_index(policy, d, prior_grad_fn<T>{dh, prior_grad, U, S, d});
  for_each_index(policy, U * d, unshift_units_fn<T>{dh, out, S, d});
}

// ---- experts and the block ------------------------------------------------------------------

template <class T>
struct bias_activate_fn {
  T* pre;
  T* act;
  const T* bias;  // row b at bias + b * bias_stride
  const std::int32_t* lengths;
  std::size_t L, c, bias_stride;
  activation kind;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t j = i % c, t = (i / c) % L, b = i / (c * L);
    if (t < rows_of(lengths, b, L)) {
      const T v = pre[i] + bias[b * bias_stride + j];
      pre[i] = v;
      act[i] = activate(kind, v);
    } else {
      pre[i] = T(0);
      act[i] = T(0);
    }
  }
};

/// On valid rows: pre += bias_b, act = act(pre); padding rows of both are set to 0.
/// pre and act are [B, L, c]; bias_b is at `bias + b * bias_stride`.
template <class T, class Policy>
void bias_activate(Policy&& policy, activation kind, T* pre, const T* bias, std::size_t bias_stride,
                   const std::int32_t* lengths, std::size_t B, std::size_t L, std::size_t c, T* act) {
  for_each_index(policy, B * L * c, bias_activate_fn<T>{pre, act, bias, lengths, L, c, bias_stride, kind});
}

template <class T>
struct activation_backward_fn {
  const T* pre;
  T* grad;
  const std::int32_t* lengths;
  std::size_t L, c;
  activation kind;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t t = (i / c) % L, b = i / (c * L);
    grad[i] = t < rows_of(lengths, b, L) ? grad[i] * activate_derivative(kind, pre[i]) : T(0);
  }
};

/// grad ⊙= act'(pre) on valid rows, 0 on padding rows; both [B, L, c].
template <class T, class Policy>
void activation_backward(Policy&& policy, activation kind, const T* pre, const std::int32_t* lengths,
                         std::size_t B, std::size_t L, std::size_t c, T* grad) {
  for_each_index(policy, B * L * c, activation_backward_fn<T>{pre, grad, lengths, L, c, kind});
}

template <class T>
struct finish_rows_fn {
  T* out;
  const T* bias;      // optional, row b at bias + b * bias_stride
  const T* residual;  // optional, same shape as out
  const std::int32_t* lengths;
  std::size_t L, c, bias_stride;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t j = i % c, t = (i / c) % L, b = i / (c * L);
    if (t < rows_of(lengths, b, L)) {
      T v = out[i];
      if (bias) v += bias[b * bias_stride + j];
      if (residual) v += residual[i];
      out[i] = v;
    } else {
      out[i] = T(0);
    }
  }
};

/// On valid rows of out [B, L, c]: out += bias_b (when bias) + residual (when residual);
/// padding rows are set to 0.
template <class T, class Policy>
void finish_rows(Policy&& policy, T* out, const T* bias, std::size_t bias_stride, const T* residual,
                 const std::int32_t* lengths, std::size_t B, std::size_t L, std::size_t c) {
  for_each_index(policy, B * L * c, finish_rows_fn<T>{out, bias, residual, lengths, L, c, bias_stride});
}

template <class T>
struct masked_copy_fn {
  const T* in;
  T* out;
  const std::int32_t* lengths;
  std::size_t L, c;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t t = (i / c) % L, b = i / (c * L);
    out[i] = t < rows_of(lengths, b, L) ? in[i] : T(0);
  }
};

/// out = in on valid rows, 0 on padding rows; [B, L, c].
template <class T, class Policy>
void masked_copy(Policy&& policy, const T* in, const std::int32_t* lengths, std::size_t B,
                 std::size_t L, std::size_t c, T* out) {
  for_each_index(policy, B * L * c, masked_copy_fn<T>{in, out, lengths, L, c});
}

template <class T>
struct row_sums_fn {
  const T* a;
  const std::int32_t* lengths;
  T* out;
  std::size_t L, c, out_stride;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t b = i / c, j = i % c;
    const std::size_t rows = rows_of(lengths, b, L);
    T s = 0;
    for (std::size_t t = 0; t < rows; ++t) s += a[(b * L + t) * c + j];
    out[b * out_stride + j] = s;
  }
};

/// out_b = Σ over example b's valid rows of a [B, L, c]; out_b is at out + b * out_stride.
template <class T, class Policy>
void example_column_sums(Policy&& policy, const T* a, const std::int32_t* lengths, std::size_t B,
                         std::size_t L, std::size_t c, T* out, std::size_t out_stride) {
  for_each_index(policy, B * c, row_sums_fn<T>{a, lengths, out, L, c, out_stride});
}

template <class T>
struct mix_fn {
  const T* outputs;  // [N, B, L, c]
  const T* coef;     // [B, N]
  const T* residual;
  const std::int32_t* lengths;
  T* y;
  std::size_t n, B, L, c;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t t = (i / c) % L, b = i / (c * L);
    if (t >= rows_of(lengths, b, L)) {
      y[i] = T(0);
      return;
    }
    T v = residual ? residual[i] : T(0);
    for (std::size_t e = 0; e < n; ++e) v += coef[b * n + e] * outputs[e * B * L * c + i];
    y[i] = v;
  }
};

/// y = residual + Σ_e coef(b, e)·outputs[e] on valid rows, 0 on padding rows; outputs is
/// [n, B, L, c], coef [B, n].
template <class T, class Policy>
void mix_outputs(Policy&& policy, const T* outputs, const T* coef, std::size_t n, const T* residual,
                 const std::int32_t* lengths, std::size_t B, std::size_t L, std::size_t c, T* y) {
  for_each_index(policy, B * L * c, mix_fn<T>{outputs, coef, residual, lengths, y, n, B, L, c});
}

template <class T>
struct scale_rows_fn {
  const T* in;
  const T* coef;  // coef of example b at coef[b * coef_stride]
  const std::int32_t* lengths;
  T* out;
  std::size_t coef_stride, L, c;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t t = (i / c) % L, b = i / (c * L);
    out[i] = t < rows_of(lengths, b, L) ? coef[b * coef_stride] * in[i] : T(0);
  }
};

/// out = coef_b · in on valid rows, 0 on padding rows; [B, L, c].
template <class T, class Policy>
void scale_rows(Policy&& policy, const T* in, const T* coef, std::size_t coef_stride,
                const std::int32_t* lengths, std::size_t B, std::size_t L, std::size_t c, T* out) {
  for_each_index(policy, B * L * c, scale_rows_fn<T>{in, coef, lengths, out, coef_stride, L, c});
}

template <class T>
struct accumulate_fn {
  const T* in;
  T* out;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const { out[i] += in[i]; }
};

/// out[0, n) += in[0, n).
template <class T, class Policy>
void accumulate(Policy&& policy, const T* in, std::size_t n, T* out) {
  for_each_index(policy, n, accumulate_fn<T>{in, out});
}

template <class T>
struct fill_fn {
  T* out;
  T value;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const { out[i] = value; }
};

/// out[0, n) = value.
template <class T, class Policy>
void fill(Policy&& policy, T* out, std::size_t n, T value) {
  for_each_index(policy, n, fill_fn<T>{out, value});
}

}  // namespace smear::device::detail
