#pragma once
/// \file cuda/device_router.hpp
/// The router as the cuda backend runs it, in an execution context's memory: pool (masked or
/// plain mean), LayerNorm (row statistics as GEMMs with a ones vector), logits z = F·W̃ᵀ (one
/// GEMM; W̃ = W or, with normalize_weights, its rows through the same LayerNorm), softmax with
/// temperature and expert dropout; backward from ∂ℓ/∂p or ∂ℓ/∂z through the
/// same steps into the router's gradients and, unless detached, the layer's ∂ℓ/∂x. The
/// parameters' layout and options are those of the host smear::router it mirrors.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/backend/cuda/layer_norm.hpp"
#include "smear/random.hpp"
#include "smear/routing/router.hpp"

namespace smear::device {

template <class T, class Ctx>
class device_router {
  template <class V>
  using buf = typename Ctx::template buffer<V>;

 public:
  /// Device buffers for the parameters of `host` (values uploaded by the owner). Every call
  /// takes the host router whose layout and options it follows.
  explicit device_router(const smear::router<T>& host) {
    values_.reserve(host.values().size(), "the router's parameters");
    grads_.reserve(host.values().size(), "the router's gradients");
  }

  T* values() noexcept { return values_.data(); }
  T* gradients() noexcept { return grads_.data(); }
  /// [B, K] logits, [B, K] probabilities after dropout, [B, d] features, all on the device.
  const T* logits() const noexcept { return logits_.data(); }
  const T* probabilities() const noexcept { return used_.data(); }
  const T* features(const smear::router<T>& host) const noexcept {
    return host.options().layer_norm ? features_.data() : pooled_.data();
  }
  /// The ∂ℓ/∂z buffer, [B, K], for the layer to fill before a backward from the logits.
  T* logit_gradients() noexcept { return dlogits_.data(); }

  std::size_t workspace_bytes() const noexcept {
    return sizeof(T) * (pooled_.capacity() + units_.capacity() + normed_.capacity() + features_.capacity() + rstd_.capacity() +
                        logits_.capacity() + soft_.capacity() + used_.capacity() + keep_.capacity() +
                        kept_.capacity() + dlogits_.capacity() + dfeatures_.capacity() +
                        ln_stats_.capacity() + ln_tmp_.capacity() + ln_tmp2_.capacity() + ones_.capacity() +
                        wnormed_.capacity() + wtilde_.capacity() + wrstd_.capacity() + dwtilde_.capacity());
  }

  /// Routes the B routing units of x ([B, L, d] in the context's memory, `lens` its lengths
  /// there or null): examples, or under segment routing the segments (L = ℓ), S per example
  /// (smear::segment_units). With `dropout`, draws the keep mask of expert dropout from `gen`
  /// on the host, in the host router's order.
  void forward(Ctx& ctx, const smear::router<T>& host, const T* x, const std::int32_t* lens, std::size_t B,
               std::size_t L, std::size_t S, bool dropout, rng& gen, const char* op) {
    reserve(ctx, host, B);
    const auto& o = host.options();
    const std::size_t d = host.input_dim(), R = host.outputs();
    auto pol = ctx.policy();
    const bool drop = dropout && o.expert_dropout > 0.0;
    if (drop || keep_ones_ < B * R) {  // an all-ones mask already on the device is reused
      keep_host_.assign(B * R, T(1));
      if (drop)
        for (auto& k : keep_host_) k = gen.uniform() >= o.expert_dropout ? T(1) : T(0);
      ctx.to_device(keep_.data(), static_cast<const T*>(keep_host_.data()), B * R, op);
      keep_ones_ = drop ? 0 : B * R;
    }
    pool(ctx, host, x, lens, B, L, S);
    const T* rv = values_.data();
    const T eps = static_cast<T>(o.layer_norm_eps);
    if (o.layer_norm)
      layer_norm(ctx, pooled_.data(), B, d, rv, rv + d, eps, normed_.data(), features_.data(), rstd_.data());
    if (o.normalize_weights) {
      const std::size_t wn = host.weight_norm_offset();
      layer_norm(ctx, rv + host.weight_offset(), R, d, rv + wn, rv + wn + d, eps, wnormed_.data(), wtilde_.data(),
                 wrstd_.data());
    }
    ctx.gemm(false, true, B, R, d, T(1), features(host), d, effective_weight(host), d, T(0), logits_.data(), R);
    detail::softmax_dropout(pol, logits_.data(), o.bias ? rv + host.bias_offset() : static_cast<const T*>(nullptr),
                            keep_.data(), B, R, inv_t(host), soft_.data(), used_.data(), kept_.data());
  }

  /// The router's first step alone: each unit's input, [B, d] in the context's memory (as
  /// smear::router::pool: its pooled tokens, or under segment routing the previous unit's, the
  /// prior for an example's first).
  const T* pool(Ctx& ctx, const smear::router<T>& host, const T* x, const std::int32_t* lens, std::size_t B,
                std::size_t L, std::size_t S) {
    reserve(ctx, host, B);
    const bool all = host.options().pool == pooling::mean;
    if (host.options().segment_length == 0) {
      detail::pool(ctx.policy(), x, lens, B, L, host.input_dim(), all, pooled_.data());
      return pooled_.data();
    }
    detail::pool(ctx.policy(), x, lens, B, L, host.input_dim(), all, units_.data());
    detail::shift_units(ctx.policy(), static_cast<const T*>(units_.data()),
                        static_cast<const T*>(values_.data() + host.segment_prior_offset()), B, S, host.input_dim(),
                        pooled_.data());
    return pooled_.data();
  }

  /// From ∂ℓ/∂p ([B, K] in the context's memory) or, when `dprobs` is null, from ∂ℓ/∂z in
  /// logit_gradients(): the router's gradients, and ∂ℓ/∂x added into dx unless detached.
  void backward(Ctx& ctx, const smear::router<T>& host, const T* dprobs, const std::int32_t* lens, std::size_t B,
                std::size_t L, std::size_t S, T* dx) {
    const auto& o = host.options();
    const std::size_t d = host.input_dim(), R = host.outputs();
    auto pol = ctx.policy();
    if (dprobs != nullptr)
      detail::softmax_dropout_backward(pol, dprobs, static_cast<const T*>(soft_.data()),
                                       static_cast<const T*>(used_.data()), static_cast<const T*>(keep_.data()),
                                       static_cast<const T*>(kept_.data()), B, R, inv_t(host), dlogits_.data());
    const T* rv = values_.data();
    T* rg = grads_.data();
    const T* dz = dlogits_.data();
    // dW̃ = dZᵀ·F (through the rows' LayerNorm into dW with normalize_weights), dc += Σ dZ, dF = dZ·W̃
    if (o.normalize_weights) {
      const std::size_t wn = host.weight_norm_offset();
      ctx.gemm(true, false, R, d, B, T(1), dz, R, features(host), d, T(0), dwtilde_.data(), d);
      layer_norm_backward(ctx, dwtilde_.data(), R, d, rv + wn, wnormed_.data(), wrstd_.data(), rg + wn, rg + wn + d);
      detail::accumulate(pol, static_cast<const T*>(dwtilde_.data()), R * d, rg + host.weight_offset());
    } else {
      ctx.gemm(true, false, R, d, B, T(1), dz, R, features(host), d, T(1), rg + host.weight_offset(), d);
    }
    if (o.bias) detail::add_column_sums(pol, dz, static_cast<const T*>(nullptr), B, R, rg + host.bias_offset());
    ctx.gemm(false, false, B, d, R, T(1), dz, R, effective_weight(host), d, T(0), dfeatures_.data(), d);
    if (o.layer_norm)
      layer_norm_backward(ctx, dfeatures_.data(), B, d, rv, normed_.data(), rstd_.data(), rg, rg + d);
    const T* dh = dfeatures_.data();
    if (o.segment_length > 0) {  // back through the shift: the prior's gradient, each unit's ∂ℓ/∂h
      detail::unshift_units(pol, dh, B, S, d, units_.data(), rg + host.segment_prior_offset());
      dh = units_.data();
    }
    if (!o.detach_input) detail::spread_pooled(pol, dh, lens, B, L, d, o.pool == pooling::mean, dx);
  }

  /// A device vector of at least n ones (shared with the layer for column sums).
  const T* ones(Ctx& ctx, std::size_t n) {
    if (ones_count_ < n) {
      ones_.reserve(n, "a ones vector");
      detail::fill(ctx.policy(), ones_.data(), n, T(1));
      ones_count_ = n;
    }
    return ones_.data();
  }

 private:
  /// LayerNorm of `rows` rows of `in` [rows, d], as smear::router computes it, with the row
  /// statistics as GEMMs with a ones vector: normed = (in − mean)·rstd, out = normed ⊙ gain + shift.
  void layer_norm(Ctx& ctx, const T* in, std::size_t rows, std::size_t d, const T* gain, const T* shift, T eps,
                  T* normed, T* out, T* rstd) {
    auto pol = ctx.policy();
    T* mean = ln_stats_.data();
    T* var = ln_stats_.data() + rows;
    const T inv_d = T(1) / static_cast<T>(d);
    const T* ones = ones_.data();
    ctx.gemm(false, false, rows, 1, d, inv_d, in, d, ones, 1, T(0), mean, 1);
    detail::center_rows(pol, in, static_cast<const T*>(mean), rows, d, ln_tmp_.data(), ln_tmp2_.data());
    ctx.gemm(false, false, rows, 1, d, inv_d, static_cast<const T*>(ln_tmp2_.data()), d, ones, 1, T(0), var, 1);
    detail::normalize_rows(pol, static_cast<const T*>(ln_tmp_.data()), static_cast<const T*>(var), gain, shift, rows,
                           d, eps, normed, out, rstd);
  }
  /// Its backward: `g` [rows, d] holds ∂ℓ/∂out and becomes ∂ℓ/∂in; dgain += Σ g ⊙ normed,
  /// dshift += Σ g.
  void layer_norm_backward(Ctx& ctx, T* g, std::size_t rows, std::size_t d, const T* gain, const T* normed,
                           const T* rstd, T* dgain, T* dshift) {
    auto pol = ctx.policy();
    detail::add_column_sums(pol, static_cast<const T*>(g), normed, rows, d, dgain);
    detail::add_column_sums(pol, static_cast<const T*>(g), static_cast<const T*>(nullptr), rows, d, dshift);
    detail::layer_norm_grad_prepare(pol, g, gain, normed, rows, d, ln_tmp_.data());
    T* mean_dn = ln_stats_.data();
    T* mean_dn_n = ln_stats_.data() + rows;
    const T inv_d = T(1) / static_cast<T>(d);
    const T* ones = ones_.data();
    ctx.gemm(false, false, rows, 1, d, inv_d, static_cast<const T*>(g), d, ones, 1, T(0), mean_dn, 1);
    ctx.gemm(false, false, rows, 1, d, inv_d, static_cast<const T*>(ln_tmp_.data()), d, ones, 1, T(0), mean_dn_n, 1);
    detail::layer_norm_grad_finish(pol, g, normed, rstd, static_cast<const T*>(mean_dn),
                                   static_cast<const T*>(mean_dn_n), rows, d);
  }
  const T* effective_weight(const smear::router<T>& host) const noexcept {
    return host.options().normalize_weights ? wtilde_.data() : values_.data() + host.weight_offset();
  }

  void reserve(Ctx& ctx, const smear::router<T>& host, std::size_t B) {
    const std::size_t d = host.input_dim(), R = host.outputs();
    const auto& o = host.options();
    if (keep_.capacity() < B * R) keep_ones_ = 0;
    pooled_.reserve(B * d, "the pooled inputs");
    if (o.segment_length > 0) units_.reserve(B * d, "the segments' pooled tokens");
    if (o.layer_norm) {
      normed_.reserve(B * d, "the normalised pooled inputs");
      features_.reserve(B * d, "the router features");
      rstd_.reserve(B, "the LayerNorm scales");
    }
    if (o.normalize_weights) {
      wnormed_.reserve(R * d, "the normalised router weight rows");
      wtilde_.reserve(R * d, "the router's effective weight");
      wrstd_.reserve(R, "the weight rows' LayerNorm scales");
      dwtilde_.reserve(R * d, "the effective weight's gradient");
    }
    if (o.layer_norm || o.normalize_weights) {
      const std::size_t rows = std::max(o.layer_norm ? B : 0, o.normalize_weights ? R : 0);
      ln_stats_.reserve(2 * rows, "the LayerNorm statistics");
      ln_tmp_.reserve(rows * d, "the LayerNorm workspace");
      ln_tmp2_.reserve(rows * d, "the LayerNorm workspace");
    }
    logits_.reserve(B * R, "the logits");
    soft_.reserve(B * R, "the softmax");
    used_.reserve(B * R, "the routing probabilities");
    keep_.reserve(B * R, "the dropout mask");
    kept_.reserve(B, "the dropout normalisers");
    dlogits_.reserve(B * R, "the logit gradients");
    dfeatures_.reserve(B * d, "the feature gradients");
    ones(ctx, std::max(d, B));
  }
  static T inv_t(const smear::router<T>& host) noexcept { return static_cast<T>(1.0 / host.options().temperature); }

  buf<T> values_, grads_, pooled_, units_, normed_, features_, rstd_, logits_, soft_, used_, keep_, kept_, dlogits_,
      dfeatures_, ln_stats_, ln_tmp_, ln_tmp2_, ones_, wnormed_, wtilde_, wrstd_, dwtilde_;
  std::vector<T> keep_host_;
  std::size_t keep_ones_ = 0;   ///< leading entries of keep_ known to be 1 on the device
  std::size_t ones_count_ = 0;
};

}  // namespace smear::device
