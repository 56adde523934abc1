#pragma once
/// \file routing/router.hpp
/// The router: pool each routing unit's tokens (an example, or under causal segment routing
/// the previous segment), optionally LayerNorm, a linear map to N logits (its weight
/// optionally normalised per expert), softmax with temperature, and expert dropout in
/// training. Its backward returns the gradient to the pooled input spread over the tokens.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "smear/error.hpp"
#include "smear/layout.hpp"
#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/routing/segments.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// How a router summarises an example's tokens.
enum class pooling {
  masked_mean,  ///< mean over the valid tokens
  mean,         ///< mean over all `length` positions, padding included (the official code's)
};

/// Router options; the defaults are the official SMEAR code's.
struct router_options {
  pooling pool = pooling::masked_mean;
  bool layer_norm = true;        ///< LayerNorm (gain 1, bias 0 at start) of the pooled vector
  double temperature = 1.0;      ///< p = softmax(z / temperature); must be > 0
  bool detach_input = false;     ///< no gradient from the router into the layer's input
  double expert_dropout = 0.0;   ///< in training, drop each p_e with this probability, renormalise
  double init_std = 0.01;        ///< N(0, init_std²) for the router weight; bias starts at 0
  double layer_norm_eps = 1e-5;
  /// The official code's normalize_router_weights: the linear map uses LayerNorm(W_e) of each
  /// expert's weight row over the input axis, with a learnable gain (starting at init_std) and
  /// shift (starting at 0) shared by the experts.
  bool normalize_weights = false;
  bool bias = true;              ///< a learned bias per output (the official code's no_router_bias: false)
  /// Causal segment routing (Lory, arXiv 2405.03133) when > 0: the routing unit is a segment
  /// of this many tokens (L must be a multiple); segment s > 0 of an example is routed by the
  /// pooled tokens of segment s − 1, segment 0 by a learned prior input (`segment_prior`), so
  /// no token's expert depends on its own segment or a later one. 0: one unit per example.
  std::size_t segment_length = 0;
};

/// Throws value_error when an option is outside its domain.
inline void validate(const router_options& o) {
  if (!(o.temperature > 0.0) || !std::isfinite(o.temperature))
    throw value_error(detail::message("router: temperature must be positive and finite, got ",
                                      o.temperature));
  if (!(o.expert_dropout >= 0.0 && o.expert_dropout < 1.0))
    throw value_error(detail::message("router: expert_dropout must be in [0, 1), got ",
                                      o.expert_dropout));
  if (!(o.layer_norm_eps > 0.0))
    throw value_error(detail::message("router: layer_norm_eps must be positive, got ",
                                      o.layer_norm_eps));
}

/// Routes each routing unit of a batch (an example, or a segment: see
/// router_options::segment_length and segment_units()) to a distribution over N experts.
///
/// Parameters, one contiguous vector: `layer_norm.weight` [d] and `layer_norm.bias` [d] (only
/// with layer_norm), `weight_norm.weight` [d] and `weight_norm.bias` [d] (only with
/// normalize_weights), `weight` [K, d], `bias` [K] (unless bias is off), `segment_prior` [d]
/// (only with segment_length; starts as N(0, 1)), for K outputs (one per expert for softmax
/// routing; DSelect-k uses ⌈log₂ N⌉ gate logits).
template <class T>
class router {
 public:
  using value_type = T;

  /// Router over `dim`-dimensional tokens, its weight drawn from a generator seeded with `seed`.
  /// Throws value_error for a zero `dim` or an option outside its domain.
  explicit router(std::size_t dim, std::size_t outputs, router_options options = {},
                  std::uint64_t seed = 0)
      : d_(dim), k_(outputs), opt_(options) {
    validate(opt_);
    if (!std::isfinite(static_cast<T>(1.0 / opt_.temperature)) || !(static_cast<T>(opt_.temperature) > T(0)))
      throw value_error(detail::message("router: temperature ", opt_.temperature, " or its inverse is not a finite ",
                                        "positive number in the router's element type (every output would be NaN)"));
    if (d_ == 0 || k_ == 0)
      throw value_error(detail::message("router: dimensions must be positive, got dim = ", d_,
                                        ", outputs = ", k_));
    layout_builder b;
    if (opt_.layer_norm)
      b.add("layer_norm.weight", {d_}, init_rule::ones()).add("layer_norm.bias", {d_}, init_rule::zeros());
    if (opt_.normalize_weights)
      b.add("weight_norm.weight", {d_}, init_rule::constant(opt_.init_std))
          .add("weight_norm.bias", {d_}, init_rule::zeros());
    b.add("weight", {k_, d_}, init_rule::normal(opt_.init_std));
    if (opt_.bias) b.add("bias", {k_}, init_rule::zeros());
    if (opt_.segment_length > 0) b.add("segment_prior", {d_}, init_rule::normal(1.0));
    layout_ = b.build();
    for (const auto& s : layout_) {
      if (s.name == "weight_norm.weight") wn_offset_ = s.offset;
      if (s.name == "weight") w_offset_ = s.offset;
      if (s.name == "segment_prior") prior_offset_ = s.offset;
    }
    values_.assign(layout_size(layout_), T(0));
    grads_.assign(values_.size(), T(0));
    rng gen{seed};
    initialize(gen);
  }

  std::size_t input_dim() const noexcept { return d_; }
  std::size_t outputs() const noexcept { return k_; }
  /// Draws forward() takes from its generator per routing unit: expert dropout's keep mask.
  std::size_t draws(bool dropout) const noexcept { return dropout && opt_.expert_dropout > 0.0 ? k_ : 0; }
  const router_options& options() const noexcept { return opt_; }
  const parameter_layout& layout() const noexcept { return layout_; }
  std::span<T> values() noexcept { return values_; }
  std::span<const T> values() const noexcept { return values_; }
  std::span<T> gradients() noexcept { return grads_; }
  std::span<const T> gradients() const noexcept { return grads_; }
  void zero_grad() noexcept { std::fill(grads_.begin(), grads_.end(), T(0)); }

  /// One named tensor (e.g. "weight" [N, d], "layer_norm.weight"), as the bank's tensor(e, name);
  /// value_error listing the layout's names for another name.
  std::span<T> tensor(std::string_view name) {
    const auto& s = find_slot(layout_, name);
    return std::span<T>(values_).subspan(s.offset, s.size());
  }
  std::span<const T> tensor(std::string_view name) const {
    const auto& s = find_slot(layout_, name);
    return std::span<const T>(values_).subspan(s.offset, s.size());
  }

  /// Draws the parameters from `gen` following the layout.
  void initialize(rng& gen) { smear::initialize(layout_, std::span<T>(values_), gen); }

  /// Appends this router's tensors to an optimiser's list (decay on the weight only).
  void append_parameters(parameter_list<T>& out, const std::string& prefix) {
    append_parameters(out, prefix, values_, grads_, false);
  }
  /// The same for a copy of the parameters laid out like this router's (a device's).
  void append_parameters(parameter_list<T>& out, const std::string& prefix, std::span<T> values,
                         std::span<T> grads, bool on_device) const {
    for (const auto& s : layout_)
      out.push_back({prefix + s.name, values.subspan(s.offset, s.size()), grads.subspan(s.offset, s.size()),
                     s.name == "weight", on_device, s.shape});
  }

  /// What one forward writes and its backward reads: pooled inputs, LayerNorm statistics,
  /// logits, probabilities, the dropout mask and gradient scratch. The router itself holds
  /// only its parameters, so one router serves any number of workspaces (a layer keeps one;
  /// each thread sharing an evaluation layer has its own: smear::layer::workspace).
  struct workspace {
    std::size_t batch = 0;     ///< routing units of the last forward (B·S under segment routing)
    std::size_t segments = 1;  ///< S: routing units per example
    std::vector<std::int32_t> unit_lengths;  ///< segment routing: each unit's valid tokens
    std::vector<T> pooled, normed, features, rstd, logits, soft, used, keep, kept, dlogits, dfeatures;
    /// normalize_weights: W's rows normalised, W̃ (what the logits use), their 1/σ, ∂ℓ/∂W̃
    std::vector<T> wnormed, wtilde, wrstd, dwtilde;

    /// Bytes held by the buffers.
    std::size_t bytes() const noexcept {
      std::size_t n = 0;
      for (const auto* v : {&pooled, &normed, &features, &rstd, &logits, &soft, &used, &keep, &kept, &dlogits,
                            &dfeatures, &wnormed, &wtilde, &wrstd, &dwtilde})
        n += v->capacity();
      return sizeof(T) * n + sizeof(std::int32_t) * unit_lengths.capacity();
    }
  };

  /// Routing probabilities of the forward that wrote `w`, after dropout: [B, N].
  matrix_ref<const T> probabilities(const workspace& w) const noexcept { return {w.used.data(), w.batch, k_}; }
  /// Softmax before dropout: [B, N].
  matrix_ref<const T> softmax(const workspace& w) const noexcept { return {w.soft.data(), w.batch, k_}; }
  /// Logits z (before the temperature): [B, N].
  matrix_ref<const T> logits(const workspace& w) const noexcept { return {w.logits.data(), w.batch, k_}; }

  /// Routes a batch (shapes checked by the caller) into `w`. With `training` and
  /// expert_dropout > 0, drops experts using `gen`.
  template <class Backend>
  void forward(Backend be, tokens<const T> x, bool training, rng& gen, workspace& w) const {
    pool(be, x, w);
    route(be, training, gen, w);
  }

  /// The rest of forward() from the routing units' inputs already in `w` (pool() or
  /// pool_segments()): LayerNorm, logits, softmax, expert dropout.
  template <class Backend>
  void route(Backend be, bool training, rng& gen, workspace& w) const {
    const std::size_t B = w.batch;
    const T eps = static_cast<T>(opt_.layer_norm_eps);
    if (opt_.layer_norm)
      layer_norm_rows(B, w.pooled.data(), values_.data(), values_.data() + d_, eps, w.normed.data(),
                      w.features.data(), w.rstd.data());
    if (opt_.normalize_weights)
      layer_norm_rows(k_, values_.data() + w_offset_, values_.data() + wn_offset_, values_.data() + wn_offset_ + d_,
                      eps, w.wnormed.data(), w.wtilde.data(), w.wrstd.data());
    // logits z = f·Wᵀ + c, softmax(z / τ)
    const std::size_t N = k_;
    matrix_ref<T> z{w.logits.data(), B, N};
    backend::gemm<T>(be, false, true, T(1), features(w), effective_weight(w), T(0), z);
    const T inv_t = static_cast<T>(1.0 / opt_.temperature);
    const bool drop = training && opt_.expert_dropout > 0.0;
    for (std::size_t b = 0; b < B; ++b) {
      T* zb = w.logits.data() + b * N;
      T* pb = w.soft.data() + b * N;
      T zmax = -std::numeric_limits<T>::infinity();
      for (std::size_t e = 0; e < N; ++e) {
        if (opt_.bias) zb[e] += bias()[e];
        zmax = std::max(zmax, zb[e] * inv_t);
      }
      T sum = 0;
      for (std::size_t e = 0; e < N; ++e) sum += (pb[e] = std::exp(zb[e] * inv_t - zmax));
      for (std::size_t e = 0; e < N; ++e) pb[e] /= sum;
      T* kb = w.keep.data() + b * N;
      T* ub = w.used.data() + b * N;
      T kept = 0;
      for (std::size_t e = 0; e < N; ++e) {
        kb[e] = (!drop || gen.uniform() >= opt_.expert_dropout) ? T(1) : T(0);
        kept += kb[e] * pb[e];
      }
      if (!(kept > T(0))) {  // every expert dropped: keep them all
        std::fill(kb, kb + N, T(1));
        kept = 1;
      }
      w.kept[b] = kept;
      for (std::size_t e = 0; e < N; ++e) ub[e] = kb[e] * pb[e] / kept;
    }
  }

  /// The router's first step alone: each routing unit's input, [B·S, d]. Unit b (S = 1) is
  /// example b's pooled tokens (options().pool); under segment routing unit b·S + s is the
  /// pooled tokens of segment s − 1 of example b, and the prior for s = 0.
  template <class Backend>
  matrix_ref<const T> pool(Backend be, tokens<const T> x, workspace& w) const {
    const tokens<const T> u = segment_units(x, opt_.segment_length, w.unit_lengths);
    const std::size_t S = u.batch / x.batch;
    reserve(u.batch, w);
    w.segments = S;
    backend::parallel_for(be, u.batch, [&](std::size_t r, std::size_t) {
      T* out = w.pooled.data() + r * d_;
      if (opt_.segment_length == 0)
        mean_rows(be, u, r, out);
      else if (r % S == 0)
        std::copy_n(prior(), d_, out);
      else
        mean_rows(be, u, r - 1, out);
    });
    return {w.pooled.data(), u.batch, d_};
  }

  /// Under segment routing, for decoding: `rows` units whose inputs are the prior (`segments`
  /// empty) or the pooled tokens of each example of `segments` (one previous segment each),
  /// exactly as pool() computes them.
  template <class Backend>
  matrix_ref<const T> pool_segments(Backend be, std::size_t rows, tokens<const T> segments, workspace& w) const {
    reserve(rows, w);
    w.segments = 1;
    for (std::size_t r = 0; r < rows; ++r) {
      if (segments.data == nullptr)
        std::copy_n(prior(), d_, w.pooled.data() + r * d_);
      else
        mean_rows(be, segments, r, w.pooled.data() + r * d_);
    }
    return {w.pooled.data(), rows, d_};
  }

  /// Given ∂ℓ/∂p ([B, K], for the probabilities of the last forward), accumulates the
  /// router's parameter gradients and, unless detached, adds ∂ℓ/∂x into `dx`.
  template <class Backend>
  void backward(Backend be, matrix_ref<const T> dprobs, tokens<T> dx, workspace& w) {
    const std::size_t B = w.batch, N = k_;
    const T inv_t = static_cast<T>(1.0 / opt_.temperature);
    for (std::size_t b = 0; b < B; ++b) {
      const T* g = dprobs.data + b * dprobs.stride;
      const T* pb = w.soft.data() + b * N;
      const T* ub = w.used.data() + b * N;
      const T* kb = w.keep.data() + b * N;
      T gu = 0;  // ⟨g, p_used⟩
      for (std::size_t e = 0; e < N; ++e) gu += g[e] * ub[e];
      T gp = 0;  // ⟨∂ℓ/∂p_soft, p_soft⟩, with ∂ℓ/∂p_soft = keep / kept ⊙ (g − gu)
      for (std::size_t e = 0; e < N; ++e) gp += kb[e] / w.kept[b] * (g[e] - gu) * pb[e];
      T* dz = w.dlogits.data() + b * N;
      for (std::size_t e = 0; e < N; ++e) dz[e] = pb[e] * (kb[e] / w.kept[b] * (g[e] - gu) - gp) * inv_t;
    }
    backward_logits(be, matrix_ref<const T>{w.dlogits.data(), B, N}, dx, w);
  }

  /// Given ∂ℓ/∂z ([B, K], for the logits of the forward that wrote `w`), accumulates the
  /// router's parameter gradients and, unless detached, adds ∂ℓ/∂x into `dx`. `dz` may alias
  /// no buffer of `w` except logit_gradients(w).
  template <class Backend>
  void backward_logits(Backend be, matrix_ref<const T> dz, tokens<T> dx, workspace& w) {
    const std::size_t B = w.batch, N = k_;

    // dW̃ = dZᵀ·F (W̃ = W, or its normalised rows), dc += Σ dZ, dF = dZ·W̃
    if (opt_.normalize_weights) {
      matrix_ref<T> dwt{w.dwtilde.data(), k_, d_};
      backend::gemm<T>(be, true, false, T(1), dz, features(w), T(0), dwt);
      layer_norm_rows_backward(k_, w.dwtilde.data(), values_.data() + wn_offset_, w.wnormed.data(), w.wrstd.data(),
                               grads_.data() + wn_offset_, grads_.data() + wn_offset_ + d_);
      backend::axpy<T>(be, T(1), std::span<const T>(w.dwtilde), {grads_.data() + w_offset_, k_ * d_});
    } else {
      backend::gemm<T>(be, true, false, T(1), dz, features(w), T(1), weight_grad());
    }
    if (opt_.bias)
      for (std::size_t b = 0; b < B; ++b)
        for (std::size_t e = 0; e < N; ++e) bias_grad()[e] += dz(b, e);
    matrix_ref<T> df{w.dfeatures.data(), B, d_};
    backend::gemm<T>(be, false, false, T(1), dz, effective_weight(w), T(0), df);
    if (opt_.layer_norm)
      layer_norm_rows_backward(B, w.dfeatures.data(), values_.data(), w.normed.data(), w.rstd.data(), grads_.data(),
                               grads_.data() + d_);
    const std::size_t S = w.segments;
    if (opt_.segment_length > 0)  // the first units' inputs are the prior
      for (std::size_t r = 0; r < B; r += S)
        for (std::size_t j = 0; j < d_; ++j) grads_[prior_offset_ + j] += w.dfeatures[r * d_ + j];
    if (opt_.detach_input) return;
    // spread ∂ℓ/∂h of each unit over the tokens it pooled: its own (S = 1) or the previous segment's
    const bool segmented = opt_.segment_length > 0;
    const tokens<T> u{dx.data, B, dx.length / S, dx.dim,
                      segmented ? std::span<const std::int32_t>(w.unit_lengths) : dx.lengths};
    backend::parallel_for(be, B, [&](std::size_t r, std::size_t) {
      if (segmented && r % S == 0) return;
      const std::size_t from = segmented ? r - 1 : r;
      const std::size_t rows = opt_.pool == pooling::mean ? u.length : u.valid(from);
      if (rows == 0) return;
      std::span<T> dh(w.dfeatures.data() + r * d_, d_);
      const T inv = T(1) / static_cast<T>(rows);
      for (auto& v : dh) v *= inv;
      backend::add_to_rows<T>(be, u.example(from).middle_rows(0, rows), std::span<const T>(dh));
    });
  }

  /// A [B, K] scratch matrix of `w` for strategies that compute ∂ℓ/∂z themselves.
  matrix_ref<T> logit_gradients(workspace& w) const noexcept { return {w.dlogits.data(), w.batch, k_}; }

 private:
  void reserve(std::size_t B, workspace& w) const {
    const std::size_t N = k_;
    w.batch = B;
    w.pooled.resize(B * d_);
    if (opt_.layer_norm) {
      w.normed.resize(B * d_);
      w.features.resize(B * d_);
      w.rstd.resize(B);
    }
    if (opt_.normalize_weights) {
      w.wnormed.resize(k_ * d_);
      w.wtilde.resize(k_ * d_);
      w.wrstd.resize(k_);
      w.dwtilde.resize(k_ * d_);
    }
    w.logits.resize(B * N);
    w.soft.resize(B * N);
    w.used.resize(B * N);
    w.keep.resize(B * N);
    w.kept.resize(B);
    w.dlogits.resize(B * N);
    w.dfeatures.resize(B * d_);
  }
  /// LayerNorm of each of `rows` rows of `in` [rows, d]: normed = (in − mean)·rstd,
  /// out = normed ⊙ gain + shift (the pooled inputs, and with normalize_weights the weight rows).
  void layer_norm_rows(std::size_t rows, const T* in, const T* gain, const T* shift, T eps, T* normed, T* out,
                       T* rstd) const {
    for (std::size_t b = 0; b < rows; ++b) {
      const T* h = in + b * d_;
      T mean = 0, var = 0;
      for (std::size_t j = 0; j < d_; ++j) mean += h[j];
      mean /= static_cast<T>(d_);
      for (std::size_t j = 0; j < d_; ++j) var += (h[j] - mean) * (h[j] - mean);
      var /= static_cast<T>(d_);
      const T r = T(1) / std::sqrt(var + eps);
      rstd[b] = r;
      for (std::size_t j = 0; j < d_; ++j) {
        normed[b * d_ + j] = (h[j] - mean) * r;
        out[b * d_ + j] = normed[b * d_ + j] * gain[j] + shift[j];
      }
    }
  }
  /// Its backward: `g` [rows, d] holds ∂ℓ/∂out and becomes ∂ℓ/∂in; dgain and dshift accumulate.
  void layer_norm_rows_backward(std::size_t rows, T* g, const T* gain, const T* normed, const T* rstd, T* dgain,
                                T* dshift) const {
    for (std::size_t b = 0; b < rows; ++b) {
      T* gb = g + b * d_;
      const T* nb = normed + b * d_;
      T mean_dn = 0, mean_dn_n = 0;
      for (std::size_t j = 0; j < d_; ++j) {
        dgain[j] += gb[j] * nb[j];
        dshift[j] += gb[j];
        gb[j] *= gain[j];  // now ∂ℓ/∂n
        mean_dn += gb[j];
        mean_dn_n += gb[j] * nb[j];
      }
      mean_dn /= static_cast<T>(d_);
      mean_dn_n /= static_cast<T>(d_);
      for (std::size_t j = 0; j < d_; ++j) gb[j] = rstd[b] * (gb[j] - mean_dn - nb[j] * mean_dn_n);  // ∂ℓ/∂in
    }
  }

  /// out ← the mean of unit r's pooled rows (options().pool; 0 when it has no valid token).
  template <class Backend>
  void mean_rows(Backend be, tokens<const T> u, std::size_t r, T* out) const {
    const std::size_t rows = opt_.pool == pooling::mean ? u.length : u.valid(r);
    std::span<T> h(out, d_);
    if (rows == 0) {  // a unit past its example's end (its successor is padding too)
      std::ranges::fill(h, T(0));
      return;
    }
    backend::column_sums<T>(be, u.example(r).middle_rows(0, rows), h);
    const T inv = T(1) / static_cast<T>(rows);
    for (auto& v : h) v *= inv;
  }
  const T* prior() const { return values_.data() + prior_offset_; }

  matrix_ref<const T> weight() const { return {values_.data() + w_offset_, k_, d_}; }
  matrix_ref<T> weight_grad() { return {grads_.data() + w_offset_, k_, d_}; }
  const T* bias() const { return values_.data() + bias_offset(); }
  T* bias_grad() { return grads_.data() + bias_offset(); }

 public:
  /// Where the tensors start in values(): the weight normalisation's gain (its shift follows,
  /// d later), the weight [K, d], the bias [K] (each only when the options have it).
  std::size_t weight_norm_offset() const noexcept { return wn_offset_; }
  std::size_t weight_offset() const noexcept { return w_offset_; }
  std::size_t bias_offset() const noexcept { return w_offset_ + k_ * d_; }
  /// segment_length > 0: where `segment_prior` [d] starts.
  std::size_t segment_prior_offset() const noexcept { return prior_offset_; }
  /// The weight the logits use, [K, d]: W, or with normalize_weights its normalised rows
  /// W̃_e = LayerNorm(W_e) of the forward that wrote `w`.
  matrix_ref<const T> effective_weight(const workspace& w) const {
    return opt_.normalize_weights ? matrix_ref<const T>{w.wtilde.data(), k_, d_} : weight();
  }
  /// What the linear map reads: the pooled input after the LayerNorm, [B, d].
  matrix_ref<const T> features(const workspace& w) const {
    return {opt_.layer_norm ? w.features.data() : w.pooled.data(), w.batch, d_};
  }

 private:
  std::size_t d_;
  std::size_t k_;
  router_options opt_;
  parameter_layout layout_;
  std::vector<T> values_, grads_;
  std::size_t wn_offset_ = 0, w_offset_ = 0, prior_offset_ = 0;
};

}  // namespace smear
