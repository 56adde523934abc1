#pragma once
/// \file routing/adamix.hpp
/// AdaMix routing: in training each parameter group of each example (the down- and the
/// up-projection of an adapter, smear::parameter_groups) comes from an independent uniformly
/// random expert; at inference the plain average of the experts, merged once and cached.

#include <cstddef>
#include <vector>

#include "smear/layout.hpp"
#include "smear/routing/planner.hpp"

namespace smear {

template <class T>
class adamix_planner : public planner_base<adamix_planner<T>, T> {
 public:
  adamix_planner(std::size_t experts, const parameter_layout& layout)
      : n_(experts), groups_(parameter_groups(layout)) {}

  router_use router(const route_context<T>&) const override { return router_use::none; }
  std::size_t draws(const route_context<T>& c) const noexcept override { return c.training ? groups_.size() : 0; }
  void plan(const route_context<T>& c, rng& gen, routing_plan<T>& out) override {
    const std::size_t B = c.batch, G = groups_.size();
    if (!c.training) {  // the average, as a one-row table
      out.reset(plan_kind::merge, B, n_);
      out.table_rows = 1;
      out.table.assign(n_, T(1) / static_cast<T>(n_));
      out.table_row.assign(B, 0);
      for (std::size_t b = 0; b < B; ++b) std::copy_n(out.table.data(), n_, out.weights.data() + b * n_);
      detail::argmax_rows<T>(out.weight_matrix(), out.choices);
      return;
    }
    out.reset(plan_kind::gather, B, n_);
    out.groups = groups_;
    out.resize_slots(G);
    std::fill(out.weights.begin(), out.weights.end(), T(0));
    const T share = T(1) / static_cast<T>(G);
    for (std::size_t b = 0; b < B; ++b) {
      for (std::size_t g = 0; g < G; ++g) {
        const auto e = static_cast<std::size_t>(gen.below(n_));
        out.expert[b * G + g] = static_cast<std::int32_t>(e);
        out.weights[b * n_ + e] += share;
      }
      out.choices[b] = out.expert[b * G];
    }
  }

 private:
  std::size_t n_;
  std::vector<parameter_range> groups_;
};

}  // namespace smear
