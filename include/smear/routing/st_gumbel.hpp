#pragma once
/// \file routing/st_gumbel.hpp
/// Top-k routing with the straight-through Gumbel-softmax estimator: in training
/// s = softmax((z + g) / τ) with Gumbel noise g (at evaluation softmax(z / τ)); the k largest
/// entries of s run, each with forward coefficient (1 − sg(s_j) + s_j) / k = 1 / k, and the
/// router's gradient flows through s: ∂ℓ/∂s_j = ⟨dy, f_j⟩ / k. τ is the router's temperature,
/// or strategy_options::gumbel_temperature at the layer's training step when that is set.

#include <cstddef>
#include <span>
#include <vector>

#include "smear/routing/estimators.hpp"
#include "smear/routing/planner.hpp"

namespace smear {

template <class T>
class st_gumbel_planner : public planner_base<st_gumbel_planner<T>, T> {
 public:
  st_gumbel_planner(std::size_t experts, std::size_t k, temperature_schedule tau = {})
      : n_(experts), k_(k), tau_(tau) {}

  /// 1 / τ of s for a forward at the layer's training step `step` (the router's `router_inv_t`
  /// without a schedule).
  T inverse_temperature(std::uint64_t step, T router_inv_t) const noexcept {
    return tau_.enabled() ? static_cast<T>(1.0 / tau_.at(step)) : router_inv_t;
  }

  router_use router(const route_context<T>&) const override { return router_use::route; }
  bool reads_router() const noexcept override { return true; }
  std::size_t draws(const route_context<T>& c) const noexcept override { return c.training ? n_ : 0; }
  void plan(const route_context<T>& c, rng& gen, routing_plan<T>& out) override {
    const std::size_t B = c.batch;
    out.reset(plan_kind::mixture, B, n_);
    out.resize_slots(k_);
    out.choice_cols = k_;
    out.choices.resize(B * k_);
    soft_.resize(B * n_);
    inv_t_ = inverse_temperature(c.step, c.inv_temperature);
    for (std::size_t b = 0; b < B; ++b) {
      std::copy_n(c.probabilities.row(b).data(), n_, out.weights.data() + b * n_);
      std::span<T> s{soft_.data() + b * n_, n_};
      std::span<std::int32_t> sel{out.expert.data() + b * k_, k_};
      estimate::gumbel_softmax<T>(c.logits.row(b), inv_t_, c.training, gen, s);
      estimate::top_k<T>(s, sel);
      for (std::size_t j = 0; j < k_; ++j) {
        out.coef[b * k_ + j] = T(1) / static_cast<T>(k_);
        out.choices[b * k_ + j] = sel[j];
      }
    }
  }
  feedback_needs needs(const routing_plan<T>&, bool) const noexcept override { return {.dcoef = true}; }
  router_gradient backward(const routing_plan<T>& p, const plan_feedback<T>& fb) override {
    auto dz = this->gradient_buffer(p.batch, n_);
    for (std::size_t b = 0; b < p.batch; ++b) {
      std::span<T> d = dz.row(b);
      for (std::size_t j = 0; j < k_; ++j)
        d[static_cast<std::size_t>(p.expert[b * k_ + j])] = fb.dcoef(b, j) / static_cast<T>(k_);
      estimate::softmax_backward<T>({soft_.data() + b * n_, n_}, d, inv_t_);
    }
    return router_gradient::logits;
  }
  std::size_t workspace_bytes() const noexcept override {
    return planner<T>::workspace_bytes() + sizeof(T) * soft_.capacity();
  }

 private:
  std::size_t n_, k_;
  temperature_schedule tau_;
  T inv_t_ = T(1);
  std::vector<T> soft_;  ///< [B, N]: the relaxed sample s of the last forward
};

}  // namespace smear
