#pragma once
/// \file routing/tag.hpp
/// Tag routing (oracle metadata): the expert of an example is its tag (task or domain id).

#include <cstddef>

#include "smear/routing/planner.hpp"

namespace smear {

/// Plans one whole expert per example: the row of the bank given by `expert_of(ctx, b)`.
template <class T>
void plan_one_expert_each(routing_plan<T>& out, std::size_t B, std::size_t N, std::size_t P, auto&& expert_of) {
  out.reset(plan_kind::gather, B, N);
  out.groups.assign(1, parameter_range{0, P});
  out.resize_slots(1);
  std::fill(out.weights.begin(), out.weights.end(), T(0));
  for (std::size_t b = 0; b < B; ++b) {
    const auto e = static_cast<std::int32_t>(expert_of(b));
    out.expert[b] = out.choices[b] = e;
    out.weights[b * N + static_cast<std::size_t>(e)] = T(1);
  }
}

template <class T>
class tag_planner : public planner_base<tag_planner<T>, T> {
 public:
  tag_planner(std::size_t experts, std::size_t parameters) : n_(experts), p_(parameters) {}

  void check(const route_context<T>& c, const char* op) const override {
    detail::check_tags(c.in.tags, c.batch, n_, "tag", " (one expert per tag)", op);
  }
  router_use router(const route_context<T>&) const override { return router_use::none; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    plan_one_expert_each(out, c.batch, n_, p_, [&](std::size_t b) { return c.in.tags[b]; });
  }

 private:
  std::size_t n_, p_;
};

/// One expert (N = 1): every strategy runs it as it is, the routing being the constant 1.
template <class T>
class single_planner : public planner_base<single_planner<T>, T> {
 public:
  explicit single_planner(std::size_t parameters) : p_(parameters) {}
  router_use router(const route_context<T>&) const override { return router_use::none; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    plan_one_expert_each(out, c.batch, 1, p_, [](std::size_t) { return 0; });
  }

 private:
  std::size_t p_;
};

}  // namespace smear
