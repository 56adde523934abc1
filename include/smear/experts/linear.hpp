#pragma once
/// \file experts/linear.hpp
/// A plain linear expert: f(x) = x·W + b.

#include <cstddef>
#include <span>

#include "smear/backend/kernels.hpp"
#include "smear/description.hpp"
#include "smear/error.hpp"
#include "smear/layout.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// Options of a linear expert.
struct linear_options {
  bool bias = true;       ///< add b
  double init_std = 0.02; ///< N(0, init_std²) for W; b starts at 0
};

/// Linear map in → out. Layout: `weight` [in, out], then `bias` [out] when enabled.
/// Saves nothing; backward needs no scratch. Not residual: the layer returns x·W + b.
template <class T>
class linear {
 public:
  using value_type = T;
  static constexpr bool row_wise = true;

  linear(std::size_t in, std::size_t out, linear_options options = {})
      : in_(in), out_(out), opt_(options) {
    if (in_ == 0 || out_ == 0)
      throw value_error(detail::message("linear: dimensions must be positive, got in = ", in_,
                                        ", out = ", out_));
    detail::checked_elements("linear", "[in, out] =", 2 * sizeof(T), in_, out_);  // P ≤ 2·in·out
  }

  std::size_t input_dim() const noexcept { return in_; }
  std::size_t output_dim() const noexcept { return out_; }
  const linear_options& options() const noexcept { return opt_; }
  std::size_t parameter_count() const noexcept { return in_ * out_ + (opt_.bias ? out_ : 0); }
  std::size_t saved_size(std::size_t) const noexcept { return 0; }
  std::size_t scratch_size(std::size_t) const noexcept { return 0; }

  /// What it computes, for checkpoints (smear/description.hpp).
  void describe(description& out) const {
    out.add("expert", "linear").add("expert.in", in_).add("expert.out", out_).add("expert.bias", opt_.bias);
  }

  parameter_layout layout() const {
    layout_builder b;
    b.add("weight", {in_, out_}, init_rule::normal(opt_.init_std));
    if (opt_.bias) b.add("bias", {out_}, init_rule::zeros());
    return b.build();
  }

  template <class Backend>
  void forward(Backend be, std::span<const T> params, matrix_ref<const T> x, matrix_ref<T> y,
               std::span<T>) const {
    backend::gemm<T>(be, false, false, T(1), x, weight(params), T(0), y);
    if (opt_.bias) backend::add_to_rows<T>(be, y, params.subspan(in_ * out_, out_));
  }

  template <class Backend>
  void backward(Backend be, std::span<const T> params, matrix_ref<const T> x, std::span<const T>,
                matrix_ref<const T> dy, matrix_ref<T> dx, std::span<T> dparams,
                std::span<T>) const {
    backend::gemm<T>(be, true, false, T(1), x, dy, T(0), matrix_ref<T>{dparams.data(), in_, out_});
    if (opt_.bias) backend::column_sums<T>(be, dy, dparams.subspan(in_ * out_, out_));
    backend::gemm<T>(be, false, true, T(1), dy, weight(params), T(0), dx);
  }

 private:
  matrix_ref<const T> weight(std::span<const T> p) const { return {p.data(), in_, out_}; }

  std::size_t in_;
  std::size_t out_;
  linear_options opt_;
};

}  // namespace smear
