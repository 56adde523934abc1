#pragma once
/// \file routing/random.hpp
/// Random routing, a heuristic baseline of the official code: every forward (training and
/// evaluation) each example runs one expert drawn uniformly from the layer's generator.

#include <cstddef>

#include "smear/routing/planner.hpp"
#include "smear/routing/tag.hpp"

namespace smear {

template <class T>
class random_planner : public planner_base<random_planner<T>, T> {
 public:
  random_planner(std::size_t experts, std::size_t parameters) : n_(experts), p_(parameters) {}

  router_use router(const route_context<T>&) const override { return router_use::none; }
  std::size_t draws(const route_context<T>&) const noexcept override { return 1; }
  void plan(const route_context<T>& c, rng& gen, routing_plan<T>& out) override {
    plan_one_expert_each(out, c.batch, n_, p_, [&](std::size_t) { return gen.below(n_); });
  }

 private:
  std::size_t n_, p_;
};

}  // namespace smear
