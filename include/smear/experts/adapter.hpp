#pragma once
/// \file experts/adapter.hpp
/// The bottleneck adapter, SMEAR's standard expert: f(x) = act(x·W_d + b_d)·W_u [+ b_u].

#include <cstddef>
#include <span>

#include "smear/activation.hpp"
#include "smear/description.hpp"
#include "smear/backend/kernels.hpp"
#include "smear/error.hpp"
#include "smear/layout.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// Options of an adapter; the defaults are the official SMEAR code's.
struct adapter_options {
  activation act = activation::silu;  ///< nonlinearity between the projections
  bool up_bias = false;               ///< add b_u after the up-projection
  double init_std = 0.01;             ///< N(0, init_std²) for W_d and W_u; biases start at 0
};

/// A plain bottleneck adapter as PyTorch code usually writes one: ReLU, and a bias on both
/// projections. With smear::plain_options() for the layer it is the "plain adapter block"
/// preset (the defaults above are the official SMEAR code's: SiLU, no up-projection bias).
inline constexpr adapter_options plain_adapter_options{.act = activation::relu, .up_bias = true};

/// Bottleneck adapter d → m → d. The layer adds the residual (`residual` is true), so a block
/// computes x + act(x·W_d + b_d)·W_u [+ b_u]; with the small default initialisation a fresh
/// block is close to the identity.
///
/// Parameter layout (row-major, in this order): `down.weight` [d, m], `down.bias` [m],
/// `up.weight` [m, d], and `up.bias` [d] when enabled.
/// Saves 2·m values per token (pre-activation and activation); backward needs m per token.
///
/// Example: `smear::adapter<float> expert{768, 24};` (T5-base with reduction factor 32).
template <class T>
class adapter {
 public:
  using value_type = T;
  static constexpr bool residual = true;
  static constexpr bool row_wise = true;

  /// Throws value_error when `dim` or `bottleneck` is zero.
  adapter(std::size_t dim, std::size_t bottleneck, adapter_options options = {})
      : d_(dim), m_(bottleneck), opt_(options) {
    if (d_ == 0 || m_ == 0)
      throw value_error(detail::message("adapter: dim and bottleneck must be positive, got dim = ",
                                        d_, ", bottleneck = ", m_));
    // P = 2·d·m + m (+ d) ≤ 4·d·m values must be addressable
    detail::checked_elements("adapter", "[dim, bottleneck] =", 4 * sizeof(T), d_, m_);
  }

  std::size_t input_dim() const noexcept { return d_; }
  std::size_t output_dim() const noexcept { return d_; }
  std::size_t bottleneck() const noexcept { return m_; }
  const adapter_options& options() const noexcept { return opt_; }
  std::size_t parameter_count() const noexcept { return 2 * d_ * m_ + m_ + (opt_.up_bias ? d_ : 0); }
  std::size_t saved_size(std::size_t rows) const noexcept { return 2 * rows * m_; }
  std::size_t scratch_size(std::size_t rows) const noexcept { return rows * m_; }

  /// What it computes, for checkpoints (smear/description.hpp).
  void describe(description& out) const {
    out.add("expert", "adapter").add("expert.dim", d_).add("expert.bottleneck", m_);
    out.add("expert.activation", to_string(opt_.act)).add("expert.up_bias", opt_.up_bias);
  }

  parameter_layout layout() const {
    layout_builder b;
    b.add("down.weight", {d_, m_}, init_rule::normal(opt_.init_std))
        .add("down.bias", {m_}, init_rule::zeros())
        .add("up.weight", {m_, d_}, init_rule::normal(opt_.init_std));
    if (opt_.up_bias) b.add("up.bias", {d_}, init_rule::zeros());
    return b.build();
  }

  template <class Backend>
  void forward(Backend be, std::span<const T> params, matrix_ref<const T> x, matrix_ref<T> y,
               std::span<T> saved) const {
    const std::size_t rows = x.rows;
    matrix_ref<T> pre{saved.data(), rows, m_};
    matrix_ref<T> act{saved.data() + rows * m_, rows, m_};
    backend::gemm<T>(be, false, false, T(1), x, w_down(params), T(0), pre);
    backend::bias_activate<T>(be, opt_.act, pre, b_down(params), act);
    backend::gemm<T>(be, false, false, T(1), act, w_up(params), T(0), y);
    if (opt_.up_bias) backend::add_to_rows<T>(be, y, b_up(params));
  }

  template <class Backend>
  void backward(Backend be, std::span<const T> params, matrix_ref<const T> x,
                std::span<const T> saved, matrix_ref<const T> dy, matrix_ref<T> dx,
                std::span<T> dparams, std::span<T> scratch) const {
    const std::size_t rows = x.rows;
    matrix_ref<const T> pre{saved.data(), rows, m_};
    matrix_ref<const T> act{saved.data() + rows * m_, rows, m_};
    matrix_ref<T> dh{scratch.data(), rows, m_};
    auto dp = [&](std::size_t offset, std::size_t r, std::size_t c) {
      return matrix_ref<T>{dparams.data() + offset, r, c};
    };
    // up-projection: dH = dY·W_uᵀ (first: it reads dY row by row, into cache for the next),
    // dW_u = Hᵀ·dY, db_u = Σ dY
    backend::gemm<T>(be, false, true, T(1), dy, w_up(params), T(0), dh);
    backend::gemm<T>(be, true, false, T(1), act, dy, T(0), dp(up_offset(), m_, d_));
    if (opt_.up_bias) backend::column_sums<T>(be, dy, dparams.subspan(up_offset() + m_ * d_, d_));
    // activation: dA = dH ⊙ act'(A)
    backend::activation_backward<T>(be, opt_.act, pre, dh);
    // down-projection: dX = dA·W_dᵀ, dW_d = Xᵀ·dA, db_d = Σ dA
    backend::gemm<T>(be, false, true, T(1), matrix_ref<const T>(dh), w_down(params), T(0), dx);
    backend::gemm<T>(be, true, false, T(1), x, matrix_ref<const T>(dh), T(0), dp(0, d_, m_));
    backend::column_sums<T>(be, matrix_ref<const T>(dh), dparams.subspan(d_ * m_, m_));
  }

 private:
  std::size_t up_offset() const noexcept { return d_ * m_ + m_; }
  matrix_ref<const T> w_down(std::span<const T> p) const { return {p.data(), d_, m_}; }
  std::span<const T> b_down(std::span<const T> p) const { return p.subspan(d_ * m_, m_); }
  matrix_ref<const T> w_up(std::span<const T> p) const { return {p.data() + up_offset(), m_, d_}; }
  std::span<const T> b_up(std::span<const T> p) const {
    return p.subspan(up_offset() + m_ * d_, d_);
  }

  std::size_t d_;
  std::size_t m_;
  adapter_options opt_;
};

}  // namespace smear
