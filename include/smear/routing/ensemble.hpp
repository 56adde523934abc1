#pragma once
/// \file routing/ensemble.hpp
/// Ensemble routing: y = Σ_e p_e f(x; θ_e), every expert run (N times the cost of SMEAR), the
/// router learning from the exact gradient ∂ℓ/∂p_e = ⟨dy, f(x; θ_e)⟩. Expert dropout applies.

#include <cstddef>

#include "smear/routing/planner.hpp"

namespace smear {

template <class T>
class ensemble_planner : public planner_base<ensemble_planner<T>, T> {
 public:
  explicit ensemble_planner(std::size_t experts) : n_(experts) {}

  router_use router(const route_context<T>&) const override { return router_use::with_dropout; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    out.reset(plan_kind::mixture, c.batch, n_);
    out.by_router = true;  // slot e = expert e, coefficient p_e
    out.slots = n_;
  }
  router_gradient backward(const routing_plan<T>&, const plan_feedback<T>&) override {
    return router_gradient::measured;
  }

 private:
  std::size_t n_;
};

}  // namespace smear
