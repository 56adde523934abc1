#pragma once
/// \file routing/soft_moe.hpp
/// Soft MoE as a routing strategy: the official SMEAR code's `soft_input_routing`
/// (r-three/smear, cvl/src/adapters/adapter_utils.py and adapter_controller_resnet_fast.py).
/// Per example b with valid tokens x_m (m < L_b), N experts of s slots each, slot j = (n, p) at
/// column j = n·s + p:
///
///   S[m, j]  = (x_m / (‖x_m‖ + ε)) · (Φ_j / (‖Φ_j‖ + ε)) · scale_j      ε = 1e-6
///   D[·, j]  = softmax over the tokens m of S[·, j]     (dispatch: per slot)
///   C[m, ·]  = softmax over the N·s slots of S[m, ·]    (combine: per token)
///   x̃_j      = Σ_m D[m, j] x_m                          (slot inputs)
///   õ_j      = f(x̃_j; θ_n)                              (expert n on its s slot rows)
///   y_m      = Σ_j C[m, j] õ_j (+ x_m with the residual)
///
/// Φ [d, N, s] (column j of the [d, N·s] matrix) and scale [N, s] replace the router. Only the
/// valid tokens take part: the softmax over tokens is over m < L_b, padding rows of y are zero.
/// The experts must act per token (row-wise: adapter, lora, linear): each runs once on the
/// B·s slot rows of the batch. The layer's routing() reports, per example, the mean over its
/// tokens of each expert's combine weight Σ_p C[m, (n, p)].

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "smear/error.hpp"
#include "smear/host_device.hpp"
#include "smear/layout.hpp"
#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/routing/planner.hpp"
#include "smear/tensor.hpp"

namespace smear {
namespace detail {

/// The ε added to every norm, as the official code does.
inline constexpr double soft_moe_epsilon = 1e-6;

/// out = v / (‖v‖ + ε) for `count` values `step` apart; returns ‖v‖ (the host's and the cuda
/// backend's Soft MoE).
template <class T>
SMEAR_HOST_DEVICE T unit_vector(const T* v, std::size_t count, std::size_t step, T* out) {
  T r = 0;
  for (std::size_t i = 0; i < count; ++i) r += v[i * step] * v[i * step];
  r = sqrt_of(r);
  const T inv = T(1) / (r + T(soft_moe_epsilon));
  for (std::size_t i = 0; i < count; ++i) out[i * step] = v[i * step] * inv;
  return r;
}

/// Its backward: out += ∂ℓ/∂v = g / (r + ε) − v·⟨v, g⟩ / (r·(r + ε)²), for g = ∂ℓ/∂v̂ and r = ‖v‖.
template <class T>
SMEAR_HOST_DEVICE void unit_vector_backward(const T* v, const T* g, T r, std::size_t count, std::size_t step, T* out) {
  T vg = 0;
  for (std::size_t i = 0; i < count; ++i) vg += v[i * step] * g[i * step];
  const T e = T(soft_moe_epsilon), a = T(1) / (r + e), c = r > T(0) ? vg / (r * (r + e) * (r + e)) : T(0);
  for (std::size_t i = 0; i < count; ++i) out[i * step] += a * g[i * step] - c * v[i * step];
}

/// out_k = softmax over k < count of s_k·c_k, with s_k = s[k·step], c_k = scale[k·scale_step]
/// and out_k at out[k·step] (a dispatch column: scale_step 0; a combine row: step 1); `out`
/// may alias nothing that `s` reads.
template <class T>
SMEAR_HOST_DEVICE void scaled_softmax(const T* s, const T* scale, std::size_t scale_step, std::size_t count,
                                      std::size_t step, T* out) {
  for (std::size_t k = 0; k < count; ++k) out[k * step] = s[k * step] * scale[k * scale_step];
  T top = out[0], sum = 0;
  for (std::size_t k = 1; k < count; ++k) top = out[k * step] > top ? out[k * step] : top;
  for (std::size_t k = 0; k < count; ++k) sum += (out[k * step] = exp_of(out[k * step] - top));
  for (std::size_t k = 0; k < count; ++k) out[k * step] /= sum;
}

}  // namespace detail

/// Soft MoE's tensors and its host math (see the file comment). Parameters, one contiguous
/// vector: `weight` Φ [d, N, s] (N(0, init_std²), init_std the router's), `scale` [N, s] (ones).
template <class T>
class soft_moe {
 public:
  using value_type = T;

  /// Soft MoE over `dim`-dimensional tokens for `experts` experts of `slots` slots each, its
  /// weight drawn from `init`. Throws value_error for a zero size.
  soft_moe(std::size_t dim, std::size_t experts, std::size_t slots, double init_std, rng& init)
      : d_(dim), n_(experts), s_(slots) {
    if (d_ == 0 || n_ == 0 || s_ == 0)
      throw value_error(detail::message("soft_moe: dimensions must be positive, got dim = ", d_, ", experts = ", n_,
                                        ", slots = ", s_));
    layout_ = layout_builder{}
                  .add("weight", {d_, n_, s_}, init_rule::normal(init_std))
                  .add("scale", {n_, s_}, init_rule::ones())
                  .build();
    values_.assign(layout_size(layout_), T(0));
    grads_.assign(values_.size(), T(0));
    smear::initialize(layout_, std::span<T>(values_), init);
  }

  std::size_t input_dim() const noexcept { return d_; }
  std::size_t experts() const noexcept { return n_; }
  std::size_t slots() const noexcept { return s_; }
  const parameter_layout& layout() const noexcept { return layout_; }
  std::span<T> values() noexcept { return values_; }
  std::span<const T> values() const noexcept { return values_; }
  std::span<T> gradients() noexcept { return grads_; }
  std::span<const T> gradients() const noexcept { return grads_; }
  void zero_grad() noexcept { std::fill(grads_.begin(), grads_.end(), T(0)); }

  /// Appends the tensors to an optimiser's list, `<prefix>weight` (decayed) and `<prefix>scale`.
  void append_parameters(parameter_list<T>& out, const std::string& prefix) {
    for (const auto& s : layout_)
      out.push_back({prefix + s.name, std::span<T>(values_).subspan(s.offset, s.size()),
                     std::span<T>(grads_).subspan(s.offset, s.size()), s.name == "weight", false, s.shape});
  }

  /// What one forward writes and its backward reads ([BL] = B·L rows, J = N·s slots).
  struct workspace {
    std::size_t batch = 0, length = 0;
    std::vector<T> xhat, xnorm;                   ///< [BL, d] the unit tokens (padding rows 0), [BL] ‖x_m‖
    std::vector<T> phihat, phinorm;               ///< [d, J] Φ's unit columns, [J] ‖Φ_j‖
    std::vector<T> cosine, dispatch, combine;     ///< [BL, J] x̂·Φ̂, D and C (padding rows 0)
    std::vector<T> slot_in, slot_out;             ///< [N, B, s, d] x̃ and [N, B, s, d_out] õ
    std::vector<T> saved, scratch, dtheta;        ///< per expert n: its saved activations, scratch, ∂ℓ/∂θ_n
    std::vector<T> dslot_in, dslot_out;           ///< ∂ℓ/∂x̃, ∂ℓ/∂õ
    std::vector<T> dcombine, dlogits;             ///< [BL, J] ∂ℓ/∂C, then ∂ℓ/∂D → ∂ℓ/∂S → ∂ℓ/∂(x̂·Φ̂)
    std::vector<T> dxhat, dphihat, dscale, sums;  ///< [BL, d], [d, J], [B, J] per example, [B, J] scratch
    std::size_t saved_stride = 0, scratch_stride = 0;

    std::size_t bytes() const noexcept {
      std::size_t n = 0;
      for (const auto* v : {&xhat, &xnorm, &phihat, &phinorm, &cosine, &dispatch, &combine, &slot_in, &slot_out, &saved,
                            &scratch, &dtheta, &dslot_in, &dslot_out, &dcombine, &dlogits, &dxhat, &dphihat, &dscale,
                            &sums})
        n += v->capacity();
      return sizeof(T) * n;
    }
  };

  /// y ← Soft MoE of x with the experts `ex` whose parameters are the rows of `bank` [N, P];
  /// every value of y is written (padding rows 0). Shapes are checked by the caller.
  template <class Backend, class Expert>
  void forward(Backend be, const Expert& ex, matrix_ref<const T> bank, tokens<const T> x, std::span<T> y,
               bool residual, workspace& w) const {
    reserve(ex, x.batch, x.length, w);
    cosines(be, x, w);
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) {
      softmaxes(x, b, w);
      dispatch(be, x, b, w);
    });
    const std::size_t rows = x.batch * s_, din = ex.input_dim(), dout = ex.output_dim();
    backend::parallel_for(be, n_, [&](std::size_t n, std::size_t) {
      ex.forward(be, bank.row(n), matrix_ref<const T>{w.slot_in.data() + n * rows * din, rows, din},
                 matrix_ref<T>{w.slot_out.data() + n * rows * dout, rows, dout}, saved(ex, n, rows, w));
    });
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) { combine(be, x, b, y, residual, w); });
  }

  /// Given dy for the forward that wrote `w`, overwrites dx (every value; padding rows 0) with
  /// ∂ℓ/∂x and adds the experts' gradients into `bank_grad` [N, P] and Φ's and scale's into
  /// gradients().
  template <class Backend, class Expert>
  void backward(Backend be, const Expert& ex, matrix_ref<const T> bank, matrix_ref<T> bank_grad, tokens<const T> x,
                std::span<const T> dy, tokens<T> dx, bool residual, workspace& w) {
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) { combine_backward(be, x, b, dy, w); });
    const std::size_t rows = x.batch * s_, din = ex.input_dim(), dout = ex.output_dim(), P = bank.cols;
    backend::parallel_for(be, n_, [&](std::size_t n, std::size_t) {
      std::span<T> g{w.dtheta.data() + n * P, P};
      ex.backward(be, bank.row(n), matrix_ref<const T>{w.slot_in.data() + n * rows * din, rows, din},
                  std::span<const T>(saved(ex, n, rows, w)),
                  matrix_ref<const T>{w.dslot_out.data() + n * rows * dout, rows, dout},
                  matrix_ref<T>{w.dslot_in.data() + n * rows * din, rows, din}, g,
                  std::span<T>(w.scratch.data() + n * w.scratch_stride, ex.scratch_size(rows)));
      backend::axpy<T>(be, T(1), std::span<const T>(g), bank_grad.row(n));
    });
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) {
      dispatch_backward(be, x, b, dy, dx, residual, w);
      softmaxes_backward(x, b, w);
    });
    cosines_backward(be, x, dx, w);
  }

  /// Each example's mean combine weight per expert, (1/L_b) Σ_m Σ_p C[m, (n, p)], into `out` [B, N].
  void expert_shares(tokens<const T> x, const workspace& w, matrix_ref<T> out) const {
    const std::size_t J = n_ * s_;
    for (std::size_t b = 0; b < x.batch; ++b) {
      std::fill_n(out.row(b).data(), n_, T(0));
      for (std::size_t m = 0; m < x.valid(b); ++m)
        for (std::size_t j = 0; j < J; ++j) out(b, j / s_) += w.combine[(b * x.length + m) * J + j];
      for (std::size_t n = 0; n < n_; ++n) out(b, n) /= static_cast<T>(x.valid(b));
    }
  }

 private:
  std::size_t slot_count() const noexcept { return n_ * s_; }
  const T* scale() const noexcept { return values_.data() + d_ * slot_count(); }
  T* scale_grad() noexcept { return grads_.data() + d_ * slot_count(); }

  template <class Expert>
  void reserve(const Expert& ex, std::size_t B, std::size_t L, workspace& w) const {
    const std::size_t J = slot_count(), BL = B * L, din = ex.input_dim(), dout = ex.output_dim(), rows = B * s_;
    w.batch = B;
    w.length = L;
    w.saved_stride = ex.saved_size(rows);
    w.scratch_stride = ex.scratch_size(rows);
    const auto grow = [](std::vector<T>& v, std::size_t n) {
      if (v.size() < n) v.resize(n);
    };
    for (auto* v : {&w.xhat, &w.dxhat}) grow(*v, BL * din);
    grow(w.xnorm, BL);
    for (auto* v : {&w.phihat, &w.dphihat}) grow(*v, din * J);
    grow(w.phinorm, J);
    for (auto* v : {&w.cosine, &w.dispatch, &w.combine, &w.dcombine, &w.dlogits}) grow(*v, BL * J);
    for (auto* v : {&w.slot_in, &w.dslot_in}) grow(*v, n_ * rows * din);
    for (auto* v : {&w.slot_out, &w.dslot_out}) grow(*v, n_ * rows * dout);
    grow(w.saved, n_ * w.saved_stride);
    grow(w.scratch, n_ * w.scratch_stride);
    grow(w.dtheta, n_ * ex.parameter_count());
    for (auto* v : {&w.dscale, &w.sums}) grow(*v, B * J);
  }
  template <class Expert>
  std::span<T> saved(const Expert& ex, std::size_t n, std::size_t rows, workspace& w) const {
    return {w.saved.data() + n * w.saved_stride, ex.saved_size(rows)};
  }

  /// Expert n's s columns of a [BL, J] buffer, example b's valid rows.
  template <class V>
  auto slot_columns(V& v, tokens<const T> x, std::size_t b, std::size_t n) const {
    using E = std::remove_pointer_t<decltype(v.data())>;
    return matrix_ref<E>{v.data() + b * x.length * slot_count() + n * s_, x.valid(b), s_, slot_count()};
  }
  /// Expert n's s slot rows of example b in an [N, B, s, cols] buffer.
  template <class V>
  auto slot_rows(V& v, std::size_t B, std::size_t b, std::size_t n, std::size_t cols) const {
    using E = std::remove_pointer_t<decltype(v.data())>;
    return matrix_ref<E>{v.data() + (n * B + b) * s_ * cols, s_, cols};
  }

  /// x̂ (valid rows; padding rows 0), Φ̂, and cosine = X̂·Φ̂ for the batch (one GEMM).
  template <class Backend>
  void cosines(Backend be, tokens<const T> x, workspace& w) const {
    const std::size_t J = slot_count(), L = x.length;
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) {
      for (std::size_t m = 0; m < L; ++m) {
        const std::size_t r = b * L + m;
        if (m < x.valid(b))
          w.xnorm[r] = detail::unit_vector(x.data + r * d_, d_, 1, w.xhat.data() + r * d_);
        else
          std::fill_n(w.xhat.data() + r * d_, d_, T(0));
      }
    });
    for (std::size_t j = 0; j < J; ++j) w.phinorm[j] = detail::unit_vector(values_.data() + j, d_, J, w.phihat.data() + j);
    backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>{w.xhat.data(), x.batch * L, d_},
                     matrix_ref<const T>{w.phihat.data(), d_, J}, T(0),
                     matrix_ref<T>{w.cosine.data(), x.batch * L, J});
  }

  /// Example b's D (softmax over its tokens, per slot) and C (softmax over the slots, per
  /// token) of S = cosine·scale; padding rows 0.
  void softmaxes(tokens<const T> x, std::size_t b, workspace& w) const {
    const std::size_t J = slot_count(), rows = x.valid(b), first = b * x.length * J;
    const T* cs = w.cosine.data() + first;
    T* D = w.dispatch.data() + first;
    T* C = w.combine.data() + first;
    for (std::size_t j = 0; j < J; ++j) detail::scaled_softmax(cs + j, scale() + j, 0, rows, J, D + j);
    for (std::size_t m = 0; m < rows; ++m) detail::scaled_softmax(cs + m * J, scale(), 1, J, 1, C + m * J);
    std::fill(D + rows * J, D + x.length * J, T(0));
    std::fill(C + rows * J, C + x.length * J, T(0));
  }

  /// Example b's slot inputs: x̃[n, b] = D_b[:, n]ᵀ·X_b, one [s, d] GEMM per expert.
  template <class Backend>
  void dispatch(Backend be, tokens<const T> x, std::size_t b, workspace& w) const {
    const matrix_ref<const T> xb = x.example(b).middle_rows(0, x.valid(b));
    for (std::size_t n = 0; n < n_; ++n)
      backend::gemm<T>(be, true, false, T(1), matrix_ref<const T>(slot_columns(w.dispatch, x, b, n)), xb, T(0),
                       slot_rows(w.slot_in, x.batch, b, n, d_));
  }

  /// Example b's rows of y: Σ_n C_b[:, n]·õ[n, b] (+ x_b), padding rows 0.
  template <class Backend>
  void combine(Backend be, tokens<const T> x, std::size_t b, std::span<T> y, bool residual, const workspace& w) const {
    const std::size_t rows = x.valid(b), dout = y.size() / (x.batch * x.length);
    matrix_ref<T> yb{y.data() + b * x.length * dout, rows, dout};
    for (std::size_t n = 0; n < n_; ++n)
      backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>(slot_columns(w.combine, x, b, n)),
                       matrix_ref<const T>(slot_rows(w.slot_out, x.batch, b, n, dout)), n == 0 ? T(0) : T(1), yb);
    if (residual) backend::axpy<T>(be, T(1), std::span<const T>(x.example(b).data, rows * dout), {yb.data, rows * dout});
    std::fill(yb.data + rows * dout, yb.data + x.length * dout, T(0));
  }

  /// Example b's ∂ℓ/∂C[:, n] = dY_b·õ[n, b]ᵀ and ∂ℓ/∂õ[n, b] = C_b[:, n]ᵀ·dY_b.
  template <class Backend>
  void combine_backward(Backend be, tokens<const T> x, std::size_t b, std::span<const T> dy, workspace& w) const {
    const std::size_t dout = dy.size() / (x.batch * x.length);
    const matrix_ref<const T> dyb{dy.data() + b * x.length * dout, x.valid(b), dout};
    for (std::size_t n = 0; n < n_; ++n) {
      backend::gemm<T>(be, false, true, T(1), dyb, matrix_ref<const T>(slot_rows(w.slot_out, x.batch, b, n, dout)),
                       T(0), slot_columns(w.dcombine, x, b, n));
      backend::gemm<T>(be, true, false, T(1), matrix_ref<const T>(slot_columns(w.combine, x, b, n)), dyb, T(0),
                       slot_rows(w.dslot_out, x.batch, b, n, dout));
    }
  }

  /// Example b's ∂ℓ/∂x through the dispatch, Σ_n D_b[:, n]·∂ℓ/∂x̃[n, b] (+ dY_b), into dx
  /// (padding rows 0), and ∂ℓ/∂D[:, n] = X_b·∂ℓ/∂x̃[n, b]ᵀ into dlogits.
  template <class Backend>
  void dispatch_backward(Backend be, tokens<const T> x, std::size_t b, std::span<const T> dy, tokens<T> dx,
                         bool residual, workspace& w) const {
    const std::size_t rows = x.valid(b), din = x.dim;
    const matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
    matrix_ref<T> dxb = dx.example(b).middle_rows(0, rows);
    for (std::size_t n = 0; n < n_; ++n) {
      const matrix_ref<const T> g = slot_rows(w.dslot_in, x.batch, b, n, din);
      backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>(slot_columns(w.dispatch, x, b, n)), g,
                       n == 0 ? T(0) : T(1), dxb);
      backend::gemm<T>(be, false, true, T(1), xb, g, T(0), slot_columns(w.dlogits, x, b, n));
    }
    if (residual) backend::axpy<T>(be, T(1), std::span<const T>(dy.data() + b * x.length * din, rows * din),
                                   {dxb.data, rows * din});
    std::fill(dxb.data + rows * din, dxb.data + x.length * din, T(0));
  }

  /// Example b's ∂ℓ/∂S from ∂ℓ/∂D (in dlogits) and ∂ℓ/∂C through both softmaxes, then its
  /// share of ∂ℓ/∂scale (into row b of dscale) and ∂ℓ/∂(x̂·Φ̂) = ∂ℓ/∂S·scale (in dlogits;
  /// padding rows 0).
  void softmaxes_backward(tokens<const T> x, std::size_t b, workspace& w) const {
    const std::size_t J = slot_count(), rows = x.valid(b), first = b * x.length * J;
    const T *D = w.dispatch.data() + first, *C = w.combine.data() + first, *dC = w.dcombine.data() + first,
            *cs = w.cosine.data() + first;
    T* g = w.dlogits.data() + first;
    T* column = w.sums.data() + b * J;  // ⟨D[·, j], ∂ℓ/∂D[·, j]⟩
    T* ds = w.dscale.data() + b * J;
    std::fill_n(column, J, T(0));
    std::fill_n(ds, J, T(0));
    for (std::size_t m = 0; m < rows; ++m)
      for (std::size_t j = 0; j < J; ++j) column[j] += D[m * J + j] * g[m * J + j];
    for (std::size_t m = 0; m < rows; ++m) {
      T row = 0;  // ⟨C[m, ·], ∂ℓ/∂C[m, ·]⟩
      for (std::size_t j = 0; j < J; ++j) row += C[m * J + j] * dC[m * J + j];
      for (std::size_t j = 0; j < J; ++j) {
        const std::size_t i = m * J + j;
        const T dS = D[i] * (g[i] - column[j]) + C[i] * (dC[i] - row);
        ds[j] += dS * cs[i];
        g[i] = dS * scale()[j];
      }
    }
    std::fill(g + rows * J, g + x.length * J, T(0));
  }

  /// From ∂ℓ/∂(x̂·Φ̂) to ∂ℓ/∂x (added into dx's valid rows), ∂ℓ/∂Φ and ∂ℓ/∂scale.
  template <class Backend>
  void cosines_backward(Backend be, tokens<const T> x, tokens<T> dx, workspace& w) {
    const std::size_t J = slot_count(), L = x.length, BL = x.batch * L;
    const matrix_ref<const T> g{w.dlogits.data(), BL, J};
    backend::gemm<T>(be, false, true, T(1), g, matrix_ref<const T>{w.phihat.data(), d_, J}, T(0),
                     matrix_ref<T>{w.dxhat.data(), BL, d_});
    backend::gemm<T>(be, true, false, T(1), matrix_ref<const T>{w.xhat.data(), BL, d_}, g, T(0),
                     matrix_ref<T>{w.dphihat.data(), d_, J});
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) {
      for (std::size_t m = 0; m < x.valid(b); ++m) {
        const std::size_t r = b * L + m;
        detail::unit_vector_backward(x.data + r * d_, w.dxhat.data() + r * d_, w.xnorm[r], d_, 1, dx.data + r * d_);
      }
    });
    for (std::size_t j = 0; j < J; ++j)
      detail::unit_vector_backward(values_.data() + j, w.dphihat.data() + j, w.phinorm[j], d_, J, grads_.data() + j);
    for (std::size_t b = 0; b < x.batch; ++b)
      for (std::size_t j = 0; j < J; ++j) scale_grad()[j] += w.dscale[b * J + j];
  }

  std::size_t d_, n_, s_;
  parameter_layout layout_;
  std::vector<T> values_, grads_;
};

/// The planner of Soft MoE: no router, a plan of kind soft; it owns the Soft MoE tensors
/// (parameters() `soft_moe.weight`, `soft_moe.scale`), which the executor runs.
template <class T>
class soft_moe_planner : public planner_base<soft_moe_planner<T>, T> {
 public:
  soft_moe_planner(std::size_t dim, std::size_t experts, std::size_t slots, double init_std, rng& init)
      : module_(dim, experts, slots, init_std, init) {}

  router_use router(const route_context<T>&) const override { return router_use::none; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    out.reset(plan_kind::soft, c.batch, module_.experts());
  }
  void append_parameters(parameter_list<T>& out) override { module_.append_parameters(out, "soft_moe."); }
  void zero_grad() noexcept override { module_.zero_grad(); }

  smear::soft_moe<T>& module() noexcept { return module_; }
  const smear::soft_moe<T>& module() const noexcept { return module_; }

 private:
  smear::soft_moe<T> module_;
};

/// The Soft MoE tensors of the planner of a soft plan; throws state_error for another planner.
template <class T>
soft_moe<T>& soft_moe_of(planner<T>& p) {
  auto* s = dynamic_cast<soft_moe_planner<T>*>(&p);
  if (s == nullptr) throw state_error("soft_moe: the layer's strategy is not soft_moe");
  return s->module();
}

}  // namespace smear
