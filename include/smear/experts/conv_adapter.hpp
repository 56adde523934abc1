#pragma once
/// \file experts/conv_adapter.hpp
/// The convolutional bottleneck adapter: the adapter's down-projection widened to a k×k
/// convolution over an example's feature map, f(x) = act(conv_k(x; W_d) + b_d)·W_u [+ b_u].

#include <algorithm>
#include <cstddef>
#include <span>

#include "smear/activation.hpp"
#include "smear/description.hpp"
#include "smear/backend/kernels.hpp"
#include "smear/error.hpp"
#include "smear/experts/nchw.hpp"
#include "smear/layout.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// Options of a convolutional adapter; activation and initialisation as for the adapter.
struct conv_adapter_options {
  activation act = activation::silu;  ///< nonlinearity between the projections
  std::size_t kernel = 3;             ///< odd size k of the k×k down-projection ("same" padding)
  bool up_bias = false;               ///< add b_u after the up-projection
  double init_std = 0.01;             ///< N(0, init_std²) for W_d and W_u; biases start at 0
};

/// Bottleneck adapter over an H×W feature map of d channels: a k×k convolution d → m with zero
/// "same" padding and stride 1, the activation, then a 1×1 convolution m → d. Each example's
/// rows are its H·W positions in row-major (NHWC) order, so an example must have exactly
/// H·W rows; smear::nchw_to_nhwc (smear/experts/nchw.hpp) produces that layout from NCHW maps.
/// The layer adds the residual (`residual` is true); with kernel = 1 it computes what
/// smear::adapter computes.
///
/// Parameter layout (row-major, in this order): `down.weight` [k, k, d, m] (tap row, tap
/// column, input channel, output channel), `down.bias` [m], `up.weight` [m, d], and `up.bias`
/// [d] when enabled. Forward saves the unrolled input (H·W·k²·d values) and 2·m values per
/// position; backward needs H·W·(k²·d + m) scratch values.
///
/// Example: `smear::conv_adapter<float> expert{8, 8, 64, 16};` (an 8×8 map of 64 channels).
template <class T>
class conv_adapter {
 public:
  using value_type = T;
  static constexpr bool residual = true;

  /// Throws value_error when a dimension is zero or the kernel size is even.
  conv_adapter(std::size_t height, std::size_t width, std::size_t dim, std::size_t bottleneck,
               conv_adapter_options options = {})
      : h_(height), w_(width), d_(dim), m_(bottleneck), opt_(options) {
    if (h_ == 0 || w_ == 0 || d_ == 0 || m_ == 0)
      throw value_error(detail::message(
          "conv_adapter: height, width, dim and bottleneck must be positive, got ",
          detail::shape(h_, w_, d_), " and bottleneck = ", m_));
    if (opt_.kernel % 2 == 0)
      throw value_error(detail::message("conv_adapter: kernel must be odd, got ", opt_.kernel));
    // P = k²·d·m + m + m·d (+ d) ≤ (k² + 3)·d·m values, and H·W positions, must be addressable
    detail::checked_elements("conv_adapter", "[kernel, kernel, dim, bottleneck] =", 4 * sizeof(T), opt_.kernel,
                             opt_.kernel, d_, m_);
    detail::checked_elements("conv_adapter", "[height, width, dim] =", sizeof(T), h_, w_, d_);
  }

  std::size_t height() const noexcept { return h_; }
  std::size_t width() const noexcept { return w_; }
  std::size_t input_dim() const noexcept { return d_; }
  std::size_t output_dim() const noexcept { return d_; }
  std::size_t bottleneck() const noexcept { return m_; }
  std::size_t positions() const noexcept { return h_ * w_; }
  const conv_adapter_options& options() const noexcept { return opt_; }
  std::size_t parameter_count() const noexcept {
    return taps() * d_ * m_ + m_ + m_ * d_ + (opt_.up_bias ? d_ : 0);
  }
  std::size_t saved_size(std::size_t rows) const noexcept { return rows * (taps() * d_ + 2 * m_); }
  std::size_t scratch_size(std::size_t rows) const noexcept { return rows * (taps() * d_ + m_); }

  /// What it computes, for checkpoints (smear/description.hpp).
  void describe(description& out) const {
    out.add("expert", "conv_adapter").add("expert.height", h_).add("expert.width", w_).add("expert.dim", d_);
    out.add("expert.bottleneck", m_).add("expert.kernel", opt_.kernel);
    out.add("expert.activation", to_string(opt_.act)).add("expert.up_bias", opt_.up_bias);
  }

  parameter_layout layout() const {
    const std::size_t k = opt_.kernel;
    layout_builder b;
    b.add("down.weight", {k, k, d_, m_}, init_rule::normal(opt_.init_std))
        .add("down.bias", {m_}, init_rule::zeros())
        .add("up.weight", {m_, d_}, init_rule::normal(opt_.init_std));
    if (opt_.up_bias) b.add("up.bias", {d_}, init_rule::zeros());
    return b.build();
  }

  /// Throws shape_error when `x` does not have H·W rows.
  template <class Backend>
  void forward(Backend be, std::span<const T> params, matrix_ref<const T> x, matrix_ref<T> y,
               std::span<T> saved) const {
    check_rows(x.rows, "conv_adapter::forward");
    const std::size_t rows = x.rows, kd = taps() * d_;
    matrix_ref<T> cols{saved.data(), rows, kd};
    matrix_ref<T> pre{saved.data() + rows * kd, rows, m_};
    matrix_ref<T> act{saved.data() + rows * (kd + m_), rows, m_};
    im2col(x, cols);
    backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>(cols), w_down(params), T(0), pre);
    backend::bias_activate<T>(be, opt_.act, pre, b_down(params), act);
    backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>(act), w_up(params), T(0), y);
    if (opt_.up_bias) backend::add_to_rows<T>(be, y, b_up(params));
  }

  template <class Backend>
  void backward(Backend be, std::span<const T> params, matrix_ref<const T> x,
                std::span<const T> saved, matrix_ref<const T> dy, matrix_ref<T> dx,
                std::span<T> dparams, std::span<T> scratch) const {
    check_rows(x.rows, "conv_adapter::backward");
    const std::size_t rows = x.rows, kd = taps() * d_;
    matrix_ref<const T> cols{saved.data(), rows, kd};
    matrix_ref<const T> pre{saved.data() + rows * kd, rows, m_};
    matrix_ref<const T> act{saved.data() + rows * (kd + m_), rows, m_};
    matrix_ref<T> dh{scratch.data(), rows, m_};
    matrix_ref<T> dcols{scratch.data() + rows * m_, rows, kd};
    auto dp = [&](std::size_t offset, std::size_t r, std::size_t c) {
      return matrix_ref<T>{dparams.data() + offset, r, c};
    };
    // 1×1 up-projection: dW_u = Hᵀ·dY, db_u = Σ dY, dH = dY·W_uᵀ
    backend::gemm<T>(be, true, false, T(1), act, dy, T(0), dp(up_offset(), m_, d_));
    if (opt_.up_bias) backend::column_sums<T>(be, dy, dparams.subspan(up_offset() + m_ * d_, d_));
    backend::gemm<T>(be, false, true, T(1), dy, w_up(params), T(0), dh);
    backend::activation_backward<T>(be, opt_.act, pre, dh);
    // k×k down-projection on the unrolled input: dW_d = Colsᵀ·dA, db_d = Σ dA,
    // dCols = dA·W_dᵀ, folded back onto the map (col2im)
    backend::gemm<T>(be, true, false, T(1), cols, matrix_ref<const T>(dh), T(0), dp(0, kd, m_));
    backend::column_sums<T>(be, matrix_ref<const T>(dh), dparams.subspan(kd * m_, m_));
    backend::gemm<T>(be, false, true, T(1), matrix_ref<const T>(dh), w_down(params), T(0), dcols);
    col2im(matrix_ref<const T>(dcols), dx);
  }

  /// Throws shape_error naming `op` when an example of `rows` rows is not a whole H×W map.
  void check_rows(std::size_t rows, const char* op) const {
    if (rows != h_ * w_)
      throw shape_error(detail::message(op, ": an example has ", rows,
                                        " rows, the expert's map is [H, W] = ", detail::shape(h_, w_),
                                        " = ", h_ * w_, " positions (padding is not supported)"));
  }

 private:
  std::size_t taps() const noexcept { return opt_.kernel * opt_.kernel; }
  std::size_t up_offset() const noexcept { return taps() * d_ * m_ + m_; }
  matrix_ref<const T> w_down(std::span<const T> p) const { return {p.data(), taps() * d_, m_}; }
  std::span<const T> b_down(std::span<const T> p) const { return p.subspan(taps() * d_ * m_, m_); }
  matrix_ref<const T> w_up(std::span<const T> p) const { return {p.data() + up_offset(), m_, d_}; }
  std::span<const T> b_up(std::span<const T> p) const {
    return p.subspan(up_offset() + m_ * d_, d_);
  }

  /// cols[(i, j), (u, v, c)] = x[(i + u - r, j + v - r), c], zero outside the map.
  void im2col(matrix_ref<const T> x, matrix_ref<T> cols) const {
    const std::size_t k = opt_.kernel, r = k / 2;
    for (std::size_t i = 0; i < h_; ++i)
      for (std::size_t j = 0; j < w_; ++j) {
        T* out = &cols(i * w_ + j, 0);
        for (std::size_t u = 0; u < k; ++u)
          for (std::size_t v = 0; v < k; ++v, out += d_) {
            const std::size_t si = i + u, sj = j + v;  // shifted by r
            if (si < r || si >= h_ + r || sj < r || sj >= w_ + r) {
              std::fill(out, out + d_, T(0));
            } else {
              const T* in = &x((si - r) * w_ + (sj - r), 0);
              std::copy(in, in + d_, out);
            }
          }
      }
  }

  /// dx[(p, q), c] = Σ over the taps that read (p, q) of dcols: the adjoint of im2col.
  void col2im(matrix_ref<const T> dcols, matrix_ref<T> dx) const {
    const std::size_t k = opt_.kernel, r = k / 2;
    for (std::size_t p = 0; p < h_ * w_; ++p) std::fill(&dx(p, 0), &dx(p, 0) + d_, T(0));
    for (std::size_t i = 0; i < h_; ++i)
      for (std::size_t j = 0; j < w_; ++j) {
        const T* in = &dcols(i * w_ + j, 0);
        for (std::size_t u = 0; u < k; ++u)
          for (std::size_t v = 0; v < k; ++v, in += d_) {
            const std::size_t si = i + u, sj = j + v;
            if (si < r || si >= h_ + r || sj < r || sj >= w_ + r) continue;
            T* out = &dx((si - r) * w_ + (sj - r), 0);
            for (std::size_t c = 0; c < d_; ++c) out[c] += in[c];
          }
      }
  }

  std::size_t h_, w_, d_, m_;
  conv_adapter_options opt_;
};

}  // namespace smear
