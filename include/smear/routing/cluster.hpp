#pragma once
/// \file routing/cluster.hpp
/// Cluster routing, a heuristic baseline of the official code: online k-means over the pooled
/// inputs. Each example runs the expert whose centre is most similar to its pooled input
/// (cosine similarity); after the assignment, every centre that received examples moves
/// towards their mean, c_e ← (1 − m)·c_e + m·mean, on every forward (training and evaluation,
/// as the official code does). The centres [N, d] start as N(0, init_scale²) and are state,
/// not parameters: checkpoints save them as `<prefix>clusters`.

#include <cmath>
#include <cstddef>
#include <vector>

#include "smear/routing/planner.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/routing/tag.hpp"

namespace smear {

template <class T>
class cluster_planner : public planner_base<cluster_planner<T>, T> {
 public:
  cluster_planner(std::size_t experts, std::size_t parameters, std::size_t dim, const strategy_options& o, rng& init)
      : n_(experts), p_(parameters), d_(dim), momentum_(o.cluster_momentum), centres_(experts * dim), sums_(experts * (dim + 1)),
        norms_(experts) {
    for (auto& v : centres_) v = static_cast<T>(o.cluster_init_scale * init.normal());
  }

  /// The centres, [N, d] (row e: expert e's).
  matrix_ref<T> centres() noexcept { return {centres_.data(), n_, d_}; }
  matrix_ref<const T> centres() const noexcept { return {centres_.data(), n_, d_}; }

  router_use router(const route_context<T>&) const override { return router_use::none; }
  bool reads_pooled() const noexcept override { return true; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    const auto h = c.pooled;
    for (std::size_t e = 0; e < n_; ++e) norms_[e] = norm({centres_.data() + e * d_, d_});
    plan_one_expert_each(out, c.batch, n_, p_, [&](std::size_t b) {
      const auto x = h.row(b);
      const T nx = norm(x);
      std::size_t best = 0;
      T best_sim = -HUGE_VAL;
      for (std::size_t e = 0; e < n_; ++e) {
        T dot = 0;
        for (std::size_t j = 0; j < d_; ++j) dot += x[j] * centres_[e * d_ + j];
        const T den = nx * norms_[e];
        const T sim = den > T(0) ? dot / den : T(0);
        if (sim > best_sim) best = e, best_sim = sim;
      }
      return best;
    });
    // the members' sums [N, d], then their counts [N] (summed over replicas: the global batch's)
    std::fill(sums_.begin(), sums_.end(), T(0));
    T* members = sums_.data() + n_ * d_;
    for (std::size_t b = 0; b < c.batch; ++b) {
      const auto e = static_cast<std::size_t>(out.expert[b]);
      members[e] += T(1);
      for (std::size_t j = 0; j < d_; ++j) sums_[e * d_ + j] += h(b, j);
    }
    detail::sum_over_replicas<T>(c.replicas, sums_);
    const T m = static_cast<T>(momentum_);
    for (std::size_t e = 0; e < n_; ++e)
      if (members[e] > T(0))
        for (std::size_t j = 0; j < d_; ++j)
          centres_[e * d_ + j] = (T(1) - m) * centres_[e * d_ + j] + m * sums_[e * d_ + j] / members[e];
  }
  std::size_t workspace_bytes() const noexcept override {
    return planner<T>::workspace_bytes() + sizeof(T) * (sums_.capacity() + norms_.capacity());
  }

 private:
  static T norm(std::span<const T> v) noexcept {
    T s = 0;
    for (T a : v) s += a * a;
    return std::sqrt(s);
  }

  std::size_t n_, p_, d_;
  double momentum_;
  std::vector<T> centres_;
  std::vector<T> sums_, norms_;  ///< per forward: the members' sums [N, d] and counts [N]; the centres' norms [N]
};

}  // namespace smear
