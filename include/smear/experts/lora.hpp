#pragma once
/// \file experts/lora.hpp
/// LoRA: a low-rank update over a frozen linear map, f(x) = x·W₀ + b₀ + s·(x·A)·B.

#include <algorithm>
#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "smear/description.hpp"
#include "smear/error.hpp"
#include "smear/layout.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// Options of a LoRA expert; the defaults are the usual LoRA ones (B starts at zero, so a
/// fresh expert computes exactly the frozen map).
struct lora_options {
  double alpha = 0.0;     ///< scale s = alpha / rank; 0 means s = 1
  double init_std = 0.01; ///< N(0, init_std²) for A; B starts at 0
};

/// Rank-r LoRA expert in → out over a frozen linear map (W₀ [in, out], optional b₀ [out])
/// shared by all experts and never merged or trained. Layout: `lora_a` [in, r], `lora_b`
/// [r, out]. Saves r values per token; no scratch beyond r per token.
///
/// Example: `smear::lora<float> e{512, 512, 8, frozen_w, frozen_b};`
template <class T>
class lora {
 public:
  using value_type = T;
  static constexpr bool row_wise = true;

  /// `frozen_weight` holds in·out values (row-major [in, out]) or is empty (no frozen map);
  /// `frozen_bias` holds out values or is empty. Throws shape_error on other sizes.
  lora(std::size_t in, std::size_t out, std::size_t rank, std::vector<T> frozen_weight = {},
       std::vector<T> frozen_bias = {}, lora_options options = {})
      : in_(in), out_(out), r_(rank), opt_(options) {
    if (in_ == 0 || out_ == 0 || r_ == 0)
      throw value_error(detail::message("lora: dimensions must be positive, got in = ", in_,
                                        ", out = ", out_, ", rank = ", r_));
    // P = r·(in + out) ≤ 2·r·max(in, out) values must be addressable
    detail::checked_elements("lora", "[rank, max(in, out)] =", 2 * sizeof(T), r_, std::max(in_, out_));
    if (!frozen_weight.empty() && frozen_weight.size() != in_ * out_)
      throw shape_error(detail::message("lora: frozen weight has ", frozen_weight.size(),
                                        " values, expected [in, out] = ", detail::shape(in_, out_)));
    if (!frozen_bias.empty() && frozen_bias.size() != out_)
      throw shape_error(detail::message("lora: frozen bias has ", frozen_bias.size(),
                                        " values, expected [out] = ", detail::shape(out_)));
    if (!frozen_weight.empty())
      w0_ = std::make_shared<const std::vector<T>>(std::move(frozen_weight));
    if (!frozen_bias.empty()) b0_ = std::make_shared<const std::vector<T>>(std::move(frozen_bias));
  }

  std::size_t input_dim() const noexcept { return in_; }
  std::size_t output_dim() const noexcept { return out_; }
  std::size_t rank() const noexcept { return r_; }
  T scale() const noexcept {
    return opt_.alpha == 0.0 ? T(1) : static_cast<T>(opt_.alpha / static_cast<double>(r_));
  }
  std::size_t parameter_count() const noexcept { return r_ * (in_ + out_); }
  std::size_t saved_size(std::size_t rows) const noexcept { return rows * r_; }
  std::size_t scratch_size(std::size_t rows) const noexcept { return rows * r_; }

  /// What it computes, for checkpoints (smear/description.hpp); the frozen map is not saved,
  /// only whether there is one.
  void describe(description& out) const {
    out.add("expert", "lora").add("expert.in", in_).add("expert.out", out_).add("expert.rank", r_);
    out.add("expert.alpha", opt_.alpha).add("expert.frozen_weight", w0_ != nullptr);
    out.add("expert.frozen_bias", b0_ != nullptr);
  }

  parameter_layout layout() const {
    return layout_builder{}
        .add("lora_a", {in_, r_}, init_rule::normal(opt_.init_std))
        .add("lora_b", {r_, out_}, init_rule::zeros())
        .build();
  }

  template <class Backend>
  void forward(Backend be, std::span<const T> params, matrix_ref<const T> x, matrix_ref<T> y,
               std::span<T> saved) const {
    matrix_ref<T> xa{saved.data(), x.rows, r_};
    backend::gemm<T>(be, false, false, T(1), x, a(params), T(0), xa);
    backend::gemm<T>(be, false, false, scale(), matrix_ref<const T>(xa), b(params), T(0), y);
    if (w0_) backend::gemm<T>(be, false, false, T(1), x, frozen(), T(1), y);
    if (b0_) backend::add_to_rows<T>(be, y, std::span<const T>(*b0_));
  }

  template <class Backend>
  void backward(Backend be, std::span<const T> params, matrix_ref<const T> x,
                std::span<const T> saved, matrix_ref<const T> dy, matrix_ref<T> dx,
                std::span<T> dparams, std::span<T> scratch) const {
    matrix_ref<const T> xa{saved.data(), x.rows, r_};
    matrix_ref<T> dxa{scratch.data(), x.rows, r_};
    // dB = s·(xA)ᵀ·dY, d(xA) = s·dY·Bᵀ, dA = xᵀ·d(xA), dx = d(xA)·Aᵀ + dY·W₀ᵀ
    backend::gemm<T>(be, true, false, scale(), xa, dy, T(0),
                     matrix_ref<T>{dparams.data() + in_ * r_, r_, out_});
    backend::gemm<T>(be, false, true, scale(), dy, b(params), T(0), dxa);
    backend::gemm<T>(be, true, false, T(1), x, matrix_ref<const T>(dxa), T(0),
                     matrix_ref<T>{dparams.data(), in_, r_});
    backend::gemm<T>(be, false, true, T(1), matrix_ref<const T>(dxa), a(params), T(0), dx);
    if (w0_) backend::gemm<T>(be, false, true, T(1), dy, frozen(), T(1), dx);
  }

 private:
  matrix_ref<const T> a(std::span<const T> p) const { return {p.data(), in_, r_}; }
  matrix_ref<const T> b(std::span<const T> p) const { return {p.data() + in_ * r_, r_, out_}; }
  matrix_ref<const T> frozen() const { return {w0_->data(), in_, out_}; }

  std::size_t in_;
  std::size_t out_;
  std::size_t r_;
  lora_options opt_;
  std::shared_ptr<const std::vector<T>> w0_;
  std::shared_ptr<const std::vector<T>> b0_;
};

}  // namespace smear
