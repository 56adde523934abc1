#pragma once
/// \file layer.hpp
/// The SMEAR routing block: route each example, merge the experts' parameters by the routing
/// probabilities in one GEMM, run each example through its merged expert.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "smear/bank.hpp"
#include "smear/concepts.hpp"
#include "smear/error.hpp"
#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/routing/router.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// Options of a layer.
struct layer_options {
  router_options router{};       ///< pooling, LayerNorm, temperature, detaching, expert dropout
  std::optional<bool> residual{};///< add the input to the output; default: the expert's `residual`
  bool check_finite = false;     ///< checked mode: throw numeric_error naming a tensor with NaN/Inf
};

namespace detail {

/// Throws numeric_error naming `what` and the first index holding NaN or ±Inf.
template <class T>
void check_finite(std::span<const T> v, const char* op, const char* what) {
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      throw numeric_error(message(op, ": ", what, " holds ", v[i], " at flat index ", i, " of ",
                                  v.size()));
}

}  // namespace detail

/// A SMEAR routing block of N experts of type `Expert`, run by `Backend`.
///
/// Forward, per example b with pooled input h_b: p_b = softmax(router(h_b) / τ),
/// θ̄_b = Σ_e p_be θ_e (one [B, N]·[N, P] GEMM for the batch), y_b = f(x_b; θ̄_b) (+ x_b when
/// residual). Backward follows DESIGN.md §1: the expert's backward gives ∂ℓ/∂x and
/// G_b = ∂ℓ/∂θ̄_b; then ∂ℓ/∂Θ += Pᵀ·G and ∂ℓ/∂P = G·Θᵀ (two GEMMs) feed the router.
///
/// Inputs are read in place: `x` must stay alive and unchanged from forward() to backward().
/// Buffers are sized at the first call with a given (B, L) and reused: after that, calls at the
/// same or a smaller shape do not allocate.
///
/// Example:
/// ```
/// smear::layer<smear::adapter<float>, 8> block{smear::adapter<float>{768, 24}, {}, 42};
/// block.forward(smear::make_tokens(x.data(), B, L, 768, lengths), y);
/// block.backward(dy, dx);   // accumulates into the parameters' gradients
/// ```
template <class Expert, std::size_t N, class Backend = default_backend>
class layer {
  static_assert(detail::diagnose_mergeable_expert<Expert>());
  static_assert(N >= 1, "smear::layer: the number of experts N must be at least 1");

 public:
  using expert_type = Expert;
  using backend_type = Backend;
  using value_type = typename Expert::value_type;
  using T = value_type;
  static constexpr std::size_t experts = N;

  /// A block of N experts shaped like `prototype`, initialised from `seed`. Throws value_error
  /// for an invalid option, or when residual is asked for an expert whose input and output
  /// dimensions differ.
  explicit layer(Expert prototype, layer_options options = {}, std::uint64_t seed = 0)
      : bank_(std::move(prototype)),
        router_(bank_.expert().input_dim(), N, options.router, seed ^ 0x5EED0F5EA4ull),
        opt_(options),
        residual_(options.residual.value_or(is_residual_expert<Expert>)),
        gen_(seed) {
    if (residual_ && bank_.expert().input_dim() != bank_.expert().output_dim())
      throw value_error(detail::message(
          "layer: residual needs input_dim == output_dim, the expert has ",
          bank_.expert().input_dim(), " -> ", bank_.expert().output_dim()));
    rng init{seed};
    bank_.initialize(init);
  }

  const Expert& expert() const noexcept { return bank_.expert(); }
  std::size_t input_dim() const noexcept { return bank_.expert().input_dim(); }
  std::size_t output_dim() const noexcept { return bank_.expert().output_dim(); }
  bool residual() const noexcept { return residual_; }
  const layer_options& options() const noexcept { return opt_; }

  expert_bank<Expert, N>& bank() noexcept { return bank_; }
  const expert_bank<Expert, N>& bank() const noexcept { return bank_; }
  smear::router<T>& router() noexcept { return router_; }
  const smear::router<T>& router() const noexcept { return router_; }

  /// Restarts the generator behind expert dropout (and any other sampling) from `seed`.
  void reseed(std::uint64_t seed) noexcept { gen_ = rng{seed}; }

  /// Training mode enables expert dropout (when configured). Default: training.
  void train(bool on = true) noexcept { training_ = on; }
  bool training() const noexcept { return training_; }

  /// Every trainable tensor: the expert bank ("experts", decayed) and the router's tensors.
  parameter_list<T> parameters() {
    parameter_list<T> out;
    auto v = bank_.values(), g = bank_.gradients();
    out.push_back({"experts", {v.data, v.rows * v.cols}, {g.data, g.rows * g.cols}, true});
    router_.append_parameters(out, "router.");
    return out;
  }

  /// Sets every gradient to zero.
  void zero_grad() noexcept {
    bank_.zero_grad();
    router_.zero_grad();
  }

  /// The routing distribution of the last forward (after expert dropout): [B, N].
  matrix_ref<const T> routing() const noexcept { return router_.probabilities(); }

  /// Bytes of the per-call buffers the layer holds now (merged parameters, saved activations,
  /// per-thread scratch, the router's).
  std::size_t workspace_bytes() const noexcept {
    return sizeof(T) * (merged_.capacity() + saved_.capacity() + dparams_.capacity() +
                        scratch_.capacity() + dprobs_.capacity()) +
           router_.workspace_bytes();
  }

  /// y ← block(x). `x` is [B, L, input_dim] with per-example lengths; `y` has B·L·output_dim
  /// values and is written in full (padding rows are zero). Throws shape_error / value_error
  /// before any work on a bad shape, and numeric_error in checked mode.
  void forward(tokens<const T> x, std::span<T> y) {
    constexpr const char* op = "smear::layer::forward";
    check_input(x, op);
    if (y.size() != x.batch * x.length * output_dim())
      throw shape_error(detail::message(op, ": y has ", y.size(), " values, expected [B, L, d_out] = ",
                                        detail::shape(x.batch, x.length, output_dim())));
    if (opt_.check_finite) detail::check_finite<T>({x.data, x.size()}, op, "x");
    reserve(x.batch, x.length);
    const Backend be{};
    const Expert& ex = bank_.expert();
    const std::size_t din = input_dim(), dout = output_dim();

    router_.forward(be, x, training_, gen_);
    // θ̄ = P·Θ for the whole batch
    backend::gemm<T>(be, false, false, T(1), router_.probabilities(),
                     matrix_ref<const T>(bank_.values()), T(0), merged());
    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      matrix_ref<T> yb{y.data() + b * x.length * dout, rows, dout};
      ex.forward(be, std::span<const T>(merged().row(b)), xb, yb, saved(b, rows));
      if (residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(xb.data, rows * din), {yb.data, rows * dout});
      std::fill(yb.data + rows * dout, yb.data + x.length * dout, T(0));
    });
    if (opt_.check_finite) detail::check_finite<T>(std::span<const T>(y), op, "y");
    last_ = x;
    pending_backward_ = true;
  }

  /// Given dy = ∂ℓ/∂y for the last forward, overwrites dx (B·L·input_dim values) with ∂ℓ/∂x
  /// and adds the parameters' gradients to bank().gradients() and router().gradients().
  /// Must follow a forward, once.
  void backward(std::span<const T> dy, std::span<T> dx) {
    constexpr const char* op = "smear::layer::backward";
    if (!pending_backward_)
      throw state_error(detail::message(op, ": no forward to go back through (backward runs "
                                            "once per forward)"));
    const tokens<const T> x = last_;
    if (dy.size() != x.batch * x.length * output_dim())
      throw shape_error(detail::message(op, ": dy has ", dy.size(), " values, expected [B, L, d_out] = ",
                                        detail::shape(x.batch, x.length, output_dim())));
    if (dx.size() != x.size())
      throw shape_error(detail::message(op, ": dx has ", dx.size(), " values, expected [B, L, d_in] = ",
                                        detail::shape(x.batch, x.length, input_dim())));
    if (opt_.check_finite) detail::check_finite<T>(dy, op, "dy");
    pending_backward_ = false;
    const Backend be{};
    const Expert& ex = bank_.expert();
    const std::size_t P = bank_.parameter_count(), din = input_dim(), dout = output_dim();

    backend::parallel_for(be, x.batch, [&](std::size_t b, std::size_t thread) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      matrix_ref<const T> dyb{dy.data() + b * x.length * dout, rows, dout};
      matrix_ref<T> dxb{dx.data() + b * x.length * din, rows, din};
      std::span<T> g{dparams_.data() + thread * P, P};
      ex.backward(be, std::span<const T>(merged().row(b)), xb, std::span<const T>(saved(b, rows)),
                  dyb, dxb, g, scratch(thread, rows));
      if (residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(dyb.data, rows * dout), {dxb.data, rows * din});
      std::fill(dxb.data + rows * din, dxb.data + x.length * din, T(0));
      // θ̄_b is no longer needed: its row now holds G_b = ∂ℓ/∂θ̄_b
      std::copy(g.begin(), g.end(), merged().row(b).begin());
    });
    const matrix_ref<const T> grad_merged = merged();
    // ∂ℓ/∂Θ += Pᵀ·G ; ∂ℓ/∂P = G·Θᵀ
    backend::gemm<T>(be, true, false, T(1), router_.probabilities(), grad_merged, T(1),
                     bank_.gradients());
    matrix_ref<T> dprobs{dprobs_.data(), x.batch, N};
    backend::gemm<T>(be, false, true, T(1), grad_merged, matrix_ref<const T>(bank_.values()), T(0),
                     dprobs);
    router_.backward(be, matrix_ref<const T>(dprobs),
                     tokens<T>{dx.data(), x.batch, x.length, din, x.lengths});
    if (opt_.check_finite) {
      detail::check_finite<T>(std::span<const T>(dx), op, "dx");
      auto g = bank_.gradients();
      detail::check_finite<T>({g.data, g.rows * g.cols}, op, "expert gradients");
      detail::check_finite<T>(std::span<const T>(router_.gradients()), op, "router gradients");
    }
  }

 private:
  void check_input(tokens<const T> x, const char* op) const {
    const auto shape = detail::shape(x.batch, x.length, x.dim);
    if (x.batch == 0 || x.length == 0)
      throw value_error(detail::message(op, ": empty batch, x is [B, L, d] = ", shape));
    if (x.data == nullptr) throw value_error(detail::message(op, ": x has no data"));
    if (x.dim != input_dim())
      throw shape_error(detail::message(op, ": x is [B, L, d] = ", shape, ", the experts expect d = ",
                                        input_dim()));
    if (!x.lengths.empty()) {
      if (x.lengths.size() != x.batch)
        throw shape_error(detail::message(op, ": lengths has ", x.lengths.size(),
                                          " entries, expected B = ", x.batch, " (x is ", shape, ")"));
      for (std::size_t b = 0; b < x.batch; ++b)
        if (x.lengths[b] < 1 || static_cast<std::size_t>(x.lengths[b]) > x.length)
          throw value_error(detail::message(op, ": example ", b, " has length ", x.lengths[b],
                                            ", expected 1..L = 1..", x.length,
                                            " (an all-padding example cannot be routed)"));
    }
  }

  void reserve(std::size_t B, std::size_t L) {
    const Backend be{};
    const std::size_t threads = backend::max_threads(be);
    const std::size_t P = bank_.parameter_count();
    saved_stride_ = bank_.expert().saved_size(L);
    scratch_stride_ = bank_.expert().scratch_size(L);
    grow(merged_, B * P);
    grow(saved_, B * saved_stride_);
    grow(dparams_, threads * P);
    grow(scratch_, threads * scratch_stride_);
    grow(dprobs_, B * N);
    batch_ = B;
  }
  static void grow(std::vector<T>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
  matrix_ref<T> merged() noexcept { return {merged_.data(), batch_, bank_.parameter_count()}; }
  std::span<T> saved(std::size_t b, std::size_t rows) noexcept {
    return {saved_.data() + b * saved_stride_, bank_.expert().saved_size(rows)};
  }
  std::span<T> scratch(std::size_t thread, std::size_t rows) noexcept {
    return {scratch_.data() + thread * scratch_stride_, bank_.expert().scratch_size(rows)};
  }

  expert_bank<Expert, N> bank_;
  smear::router<T> router_;
  layer_options opt_;
  bool residual_;
  bool training_ = true;
  rng gen_;
  std::vector<T> merged_, saved_, dparams_, scratch_, dprobs_;
  std::size_t batch_ = 0, saved_stride_ = 0, scratch_stride_ = 0;
  tokens<const T> last_{};
  bool pending_backward_ = false;
};

}  // namespace smear
