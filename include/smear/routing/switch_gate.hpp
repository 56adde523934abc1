#pragma once
/// \file routing/switch_gate.hpp
/// Top-k "switch" routing, as the official SMEAR code's top-1 baseline: the k most probable
/// experts run, each output scaled by its probability, y = x + Σ_j c_j f(x; θ_j) with c_j = p_j
/// (or p_j / Σ_chosen p with `switch_renormalize`), in training and at evaluation alike. The
/// router learns from the exact gradient of those coefficients, ∂ℓ/∂c_j = ⟨dy, f_j⟩; no
/// estimator is involved, the choice itself carries no gradient.

#include <cstddef>
#include <span>
#include <vector>

#include "smear/routing/estimators.hpp"
#include "smear/routing/planner.hpp"

namespace smear {

template <class T>
class switch_planner : public planner_base<switch_planner<T>, T> {
 public:
  switch_planner(std::size_t experts, std::size_t k, bool renormalize) : n_(experts), k_(k), renorm_(renormalize) {}

  router_use router(const route_context<T>&) const override { return router_use::route; }
  bool reads_router() const noexcept override { return true; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    const std::size_t B = c.batch;
    out.reset(plan_kind::mixture, B, n_);
    out.resize_slots(k_);
    out.choice_cols = k_;
    out.choices.resize(B * k_);
    sums_.resize(B);
    for (std::size_t b = 0; b < B; ++b) {
      const auto p = c.probabilities.row(b);
      std::copy(p.begin(), p.end(), out.weights.begin() + static_cast<std::ptrdiff_t>(b * n_));
      std::span<std::int32_t> sel{out.expert.data() + b * k_, k_};
      estimate::top_k<T>(p, sel);
      T sum = 0;
      for (std::size_t j = 0; j < k_; ++j) sum += p[static_cast<std::size_t>(sel[j])];
      sums_[b] = renorm_ ? sum : T(1);
      for (std::size_t j = 0; j < k_; ++j) {
        out.coef[b * k_ + j] = p[static_cast<std::size_t>(sel[j])] / sums_[b];
        out.choices[b * k_ + j] = sel[j];
      }
    }
  }
  feedback_needs needs(const routing_plan<T>&, bool) const noexcept override { return {.dcoef = true}; }
  router_gradient backward(const routing_plan<T>& p, const plan_feedback<T>& fb) override {
    auto dp = this->gradient_buffer(p.batch, n_);
    for (std::size_t b = 0; b < p.batch; ++b) {
      T mean = 0;  // with renormalisation c_j = p_j / S: ∂ℓ/∂p_j = (∂ℓ/∂c_j − Σ_i c_i ∂ℓ/∂c_i) / S
      if (renorm_)
        for (std::size_t j = 0; j < k_; ++j) mean += p.coef[b * k_ + j] * fb.dcoef(b, j);
      for (std::size_t j = 0; j < k_; ++j)
        dp(b, static_cast<std::size_t>(p.expert[b * k_ + j])) = (fb.dcoef(b, j) - mean) / sums_[b];
    }
    return router_gradient::probabilities;
  }

 private:
  std::size_t n_, k_;
  bool renorm_;
  std::vector<T> sums_;  ///< [B]: S per example (1 without renormalisation)
};

}  // namespace smear
