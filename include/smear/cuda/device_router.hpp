#pragma once
/// \file cuda/device_router.hpp
/// The router as the cuda backend runs it, in an execution context's memory: pool (masked or
/// plain mean), LayerNorm (row statistics as GEMMs with a ones vector), logits z = F·Wᵀ (one
/// GEMM), softmax with temperature and expert dropout; backward from ∂ℓ/∂p or ∂ℓ/∂z through the
/// same steps into the router's gradients and, unless detached, the layer's ∂ℓ/∂x. The
/// parameters' layout and options are those of the host smear::router it mirrors.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
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
    return sizeof(T) * (pooled_.capacity() + normed_.capacity() + features_.capacity() + rstd_.capacity() +
                        logits_.capacity() + soft_.capacity() + used_.capacity() + keep_.capacity() +
                        kept_.capacity() + dlogits_.capacity() + dfeatures_.capacity() +
                        ln_stats_.capacity() + ln_tmp_.capacity() + ln_tmp2_.capacity() + ones_.capacity());
  }

  /// Routes x ([B, L, d] in the context's memory, `lens` its lengths there or null). With
  /// `dropout`, draws the keep mask of expert dropout from `gen` on the host, in the host
  /// router's order.
  void forward(Ctx& ctx, const smear::router<T>& host, const T* x, const std::int32_t* lens, std::size_t B, std::size_t L, bool dropout,
               rng& gen, const char* op) {
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
    detail::pool(pol, x, lens, B, L, d, o.pool == pooling::mean, pooled_.data());
    const T* rv = values_.data();
    if (o.layer_norm) {
      T* mean = ln_stats_.data();
      T* var = ln_stats_.data() + B;
      const T inv_d = T(1) / static_cast<T>(d);
      ctx.gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(pooled_.data()), d,
               static_cast<const T*>(ones_.data()), 1, T(0), mean, 1);
      detail::center_rows(pol, static_cast<const T*>(pooled_.data()), static_cast<const T*>(mean), B, d,
                          ln_tmp_.data(), ln_tmp2_.data());
      ctx.gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(ln_tmp2_.data()), d,
               static_cast<const T*>(ones_.data()), 1, T(0), var, 1);
      detail::normalize_rows(pol, static_cast<const T*>(ln_tmp_.data()), static_cast<const T*>(var), rv, rv + d, B,
                             d, static_cast<T>(o.layer_norm_eps), normed_.data(), features_.data(), rstd_.data());
    }
    ctx.gemm(false, true, B, R, d, T(1), features(host), d, rv + weight_offset(host), d, T(0), logits_.data(), R);
    detail::softmax_dropout(pol, logits_.data(), rv + weight_offset(host) + R * d, keep_.data(), B, R, inv_t(host),
                            soft_.data(), used_.data(), kept_.data());
  }

  /// From ∂ℓ/∂p ([B, K] in the context's memory) or, when `dprobs` is null, from ∂ℓ/∂z in
  /// logit_gradients(): the router's gradients, and ∂ℓ/∂x added into dx unless detached.
  void backward(Ctx& ctx, const smear::router<T>& host, const T* dprobs, const std::int32_t* lens, std::size_t B,
                std::size_t L, T* dx) {
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
    ctx.gemm(true, false, R, d, B, T(1), dz, R, features(host), d, T(1), rg + weight_offset(host), d);
    detail::add_column_sums(pol, dz, static_cast<const T*>(nullptr), B, R, rg + weight_offset(host) + R * d);
    ctx.gemm(false, false, B, d, R, T(1), dz, R, rv + weight_offset(host), d, T(0), dfeatures_.data(), d);
    if (o.layer_norm) {
      // dgain += Σ_b df ⊙ normed, dshift += Σ_b df; then ∂ℓ/∂h with the row means as GEMMs
      const T* nrm = normed_.data();
      T* df = dfeatures_.data();
      detail::add_column_sums(pol, static_cast<const T*>(df), nrm, B, d, rg);
      detail::add_column_sums(pol, static_cast<const T*>(df), static_cast<const T*>(nullptr), B, d, rg + d);
      detail::layer_norm_grad_prepare(pol, df, rv, nrm, B, d, ln_tmp_.data());
      T* mean_dn = ln_stats_.data();
      T* mean_dn_n = ln_stats_.data() + B;
      const T inv_d = T(1) / static_cast<T>(d);
      const T* ones = ones_.data();
      ctx.gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(df), d, ones, 1, T(0), mean_dn, 1);
      ctx.gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(ln_tmp_.data()), d, ones, 1, T(0), mean_dn_n, 1);
      detail::layer_norm_grad_finish(pol, df, nrm, static_cast<const T*>(rstd_.data()), static_cast<const T*>(mean_dn),
                                     static_cast<const T*>(mean_dn_n), B, d);
    }
    if (!o.detach_input)
      detail::spread_pooled(pol, static_cast<const T*>(dfeatures_.data()), lens, B, L, d, o.pool == pooling::mean, dx);
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
  void reserve(Ctx& ctx, const smear::router<T>& host, std::size_t B) {
    const std::size_t d = host.input_dim(), R = host.outputs();
    if (keep_.capacity() < B * R) keep_ones_ = 0;
    pooled_.reserve(B * d, "the pooled inputs");
    if (host.options().layer_norm) {
      normed_.reserve(B * d, "the normalised pooled inputs");
      features_.reserve(B * d, "the router features");
      rstd_.reserve(B, "the LayerNorm scales");
      ln_stats_.reserve(2 * B, "the LayerNorm statistics");
      ln_tmp_.reserve(B * d, "the LayerNorm workspace");
      ln_tmp2_.reserve(B * d, "the LayerNorm workspace");
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
  static std::size_t weight_offset(const smear::router<T>& host) noexcept {
    return host.options().layer_norm ? 2 * host.input_dim() : 0;
  }
  static T inv_t(const smear::router<T>& host) noexcept { return static_cast<T>(1.0 / host.options().temperature); }

  buf<T> values_, grads_, pooled_, normed_, features_, rstd_, logits_, soft_, used_, keep_, kept_, dlogits_,
      dfeatures_, ln_stats_, ln_tmp_, ln_tmp2_, ones_;
  std::vector<T> keep_host_;
  std::size_t keep_ones_ = 0;   ///< leading entries of keep_ known to be 1 on the device
  std::size_t ones_count_ = 0;
};

}  // namespace smear::device
