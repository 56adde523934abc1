#pragma once
/// \file routing/smear.hpp
/// SMEAR routing (the paper's method): each example's experts merged by the router's
/// probabilities, Θ̄ = P·Θ; the router learns from the exact gradient ∂ℓ/∂P = G·Θᵀ. At inference
/// a fixed distribution per task (set_task_routing) can replace the router: every example with
/// tag t is merged by row t, each row merged once and cached.

#include <cmath>
#include <cstddef>
#include <vector>

#include "smear/error.hpp"
#include "smear/routing/planner.hpp"

namespace smear {

template <class T>
class smear_planner : public planner_base<smear_planner<T>, T> {
 public:
  explicit smear_planner(std::size_t experts) : n_(experts) {}

  /// Row t of `p` ([tasks, N], rows summing to 1) routes the examples tagged t in evaluation
  /// mode. Throws shape_error / value_error for a bad matrix.
  void set_task_routing(matrix_ref<const T> p) {
    const char* op = "layer::set_task_routing";
    if (p.rows == 0 || p.cols != n_)
      throw shape_error(detail::message(op, ": p is ", detail::shape(p.rows, p.cols),
                                        ", expected [tasks, N] with N = ", n_));
    std::vector<T> table(p.rows * n_);
    for (std::size_t t = 0; t < p.rows; ++t) {
      T sum = 0;
      for (std::size_t e = 0; e < n_; ++e) {
        if (!(p(t, e) >= T(0)) || !std::isfinite(p(t, e)))
          throw value_error(detail::message(op, ": p(", t, ", ", e, ") = ", p(t, e), " is not a probability"));
        sum += table[t * n_ + e] = p(t, e);
      }
      if (std::abs(sum - T(1)) > T(1e-3))
        throw value_error(detail::message(op, ": row ", t, " sums to ", sum, ", expected 1"));
    }
    tasks_ = std::move(table);
  }
  void clear_task_routing() noexcept { tasks_.clear(); }

  void check(const route_context<T>& c, const char* op) const override {
    if (task_routed(c)) detail::check_tags(c.in.tags, c.batch, tasks_.size() / n_, "smear", " (one row per task)", op);
  }
  router_use router(const route_context<T>& c) const override {
    return task_routed(c) ? router_use::none : router_use::with_dropout;
  }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    out.reset(plan_kind::merge, c.batch, n_);
    if (!task_routed(c)) {
      out.by_router = true;
      return;
    }
    out.table_rows = tasks_.size() / n_;
    out.table = tasks_;
    out.table_row.resize(c.batch);
    for (std::size_t b = 0; b < c.batch; ++b) {
      const auto t = static_cast<std::size_t>(c.in.tags[b]);
      out.table_row[b] = static_cast<std::uint32_t>(t);
      std::copy_n(tasks_.data() + t * n_, n_, out.weights.data() + b * n_);
    }
    detail::argmax_rows<T>(out.weight_matrix(), out.choices);
  }
  router_gradient backward(const routing_plan<T>& p, const plan_feedback<T>&) override {
    return p.by_router ? router_gradient::measured : router_gradient::none;
  }

 private:
  bool task_routed(const route_context<T>& c) const noexcept {
    return !c.training && !tasks_.empty() && !c.in.tags.empty();
  }
  std::size_t n_;
  std::vector<T> tasks_;  ///< [tasks, N]; empty: no task routing
};

}  // namespace smear
