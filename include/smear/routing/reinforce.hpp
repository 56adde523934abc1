#pragma once
/// \file routing/reinforce.hpp
/// Top-1 routing trained by REINFORCE: in training e ~ p (at evaluation the argmax) runs with
/// coefficient 1; the router's gradient is that of mean_b w·(ℓ_b − baseline_b)·log p_b(e_b)
/// − bonus·H(p_b) (w the policy weight), from each example's loss given to backward(). The baseline is a moving
/// average of the loss or a small net on the router's detached features (routing/baseline.hpp).

#include <cstddef>
#include <span>
#include <vector>

#include "smear/routing/baseline.hpp"
#include "smear/routing/estimators.hpp"
#include "smear/routing/planner.hpp"

namespace smear {

template <class T>
class reinforce_planner : public planner_base<reinforce_planner<T>, T> {
 public:
  reinforce_planner(std::size_t experts, const strategy_options& o, std::size_t features, rng& init)
      : n_(experts), bonus_(o.entropy_bonus), policy_weight_(o.policy_weight),
        baseline_(o.baseline, features, o.baseline_hidden, o.baseline_momentum, init, o.value_loss, o.huber_delta) {}

  reinforce_baseline<T>& baseline() noexcept { return baseline_; }
  const reinforce_baseline<T>& baseline() const noexcept { return baseline_; }

  router_use router(const route_context<T>&) const override { return router_use::route; }
  bool reads_router() const noexcept override { return true; }
  std::size_t draws(const route_context<T>& c) const noexcept override { return c.training ? 1 : 0; }
  void plan(const route_context<T>& c, rng& gen, routing_plan<T>& out) override {
    const std::size_t B = c.batch;
    out.reset(plan_kind::mixture, B, n_);
    out.resize_slots(1);
    inv_t_ = c.inv_temperature;
    for (std::size_t b = 0; b < B; ++b) {
      const auto p = c.probabilities.row(b);
      std::copy(p.begin(), p.end(), out.weights.begin() + static_cast<std::ptrdiff_t>(b * n_));
      const auto e = static_cast<std::int32_t>(estimate::sample_or_argmax<T>(p, c.training, gen));
      out.expert[b] = out.choices[b] = e;
      out.coef[b] = T(1);
      if (bonus_ != 0.0)
        out.auxiliary_loss -= static_cast<T>(bonus_) * estimate::entropy<T>(p) / static_cast<T>(B);
    }
  }
  bool needs_losses(bool training) const noexcept override { return training; }
  feedback_needs needs(const routing_plan<T>&, bool training) const noexcept override {
    return {.features = training && baseline_.kind() == baseline::learned};
  }
  router_gradient backward(const routing_plan<T>& p, const plan_feedback<T>& fb) override {
    if (!fb.training) return router_gradient::none;  // argmax routing: nothing to estimate
    const std::size_t B = p.batch;
    const T inv_b = T(1) / static_cast<T>(B);
    base_.resize(B);
    baseline_.predict(fb.features, fb.losses, base_, fb.replicas);
    auto dz = this->gradient_buffer(B, n_);
    for (std::size_t b = 0; b < B; ++b)
      estimate::reinforce_gradient<T>(p.weight_matrix().row(b), static_cast<std::size_t>(p.expert[b]),
                                      static_cast<T>(policy_weight_) * (fb.losses[b] - base_[b]) * inv_b,
                                      static_cast<T>(bonus_) * inv_b, inv_t_,
                                      dz.row(b));
    baseline_.update(fb.features, fb.losses, base_);
    return router_gradient::logits;
  }
  void append_parameters(parameter_list<T>& out) override { baseline_.append_parameters(out, "baseline."); }
  void zero_grad() noexcept override { baseline_.zero_grad(); }

 private:
  std::size_t n_;
  double bonus_, policy_weight_;
  T inv_t_ = T(1);
  reinforce_baseline<T> baseline_;
  std::vector<T> base_;
};

}  // namespace smear
