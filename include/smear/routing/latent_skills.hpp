#pragma once
/// \file routing/latent_skills.hpp
/// Latent-skill routing (Ponti et al., 2022): a learned task × expert allocation. Training
/// samples a relaxed Bernoulli per entry, s = σ((a + log u − log(1 − u)) / τ) with u ~ U(0, 1);
/// inference uses s = σ(a). Each row is normalised, w = s / Σ s, and merges the experts.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/routing/planner.hpp"
#include "smear/tensor.hpp"

namespace smear {

template <class T>
class latent_skills {
 public:
  /// `tasks` × `experts` logits drawn from U(−init, init).
  latent_skills(std::size_t tasks, std::size_t experts, double temperature, double init, rng& gen)
      : tasks_(tasks), experts_(experts), temperature_(temperature),
        logits_(tasks * experts), grads_(tasks * experts, T(0)) {
    for (auto& a : logits_) a = static_cast<T>(init * (2.0 * gen.uniform() - 1.0));
  }

  std::size_t tasks() const noexcept { return tasks_; }
  /// The logits a: [tasks, experts].
  matrix_ref<T> logits() noexcept { return {logits_.data(), tasks_, experts_}; }
  matrix_ref<const T> logits() const noexcept { return {logits_.data(), tasks_, experts_}; }
  matrix_ref<const T> gradients() const noexcept { return {grads_.data(), tasks_, experts_}; }
  void zero_grad() noexcept { std::fill(grads_.begin(), grads_.end(), T(0)); }

  void append_parameters(parameter_list<T>& out, const std::string& prefix) {
    out.push_back({prefix + "logits", logits_, grads_, false, false, {tasks_, experts_}});
  }

  /// Writes task `task`'s allocation s (before normalisation) and weights w = s / Σ s.
  /// In training the entries are sampled with `gen`.
  void weights(std::size_t task, bool training, rng& gen, std::span<T> s, std::span<T> w) const {
    const T* a = logits_.data() + task * experts_;
    T sum = 0;
    for (std::size_t e = 0; e < experts_; ++e) {
      double t = static_cast<double>(a[e]);
      if (training) {
        const double u = gen.uniform_positive();
        t = (t + std::log(u) - std::log1p(-u)) / temperature_;
      }
      s[e] = static_cast<T>(1.0 / (1.0 + std::exp(-t)));
      sum += s[e];
    }
    for (std::size_t e = 0; e < experts_; ++e) w[e] = s[e] / sum;
  }

  /// Given ∂ℓ/∂w for weights computed by weights(task, training, ...) as (s, w), accumulates
  /// ∂ℓ/∂a into the task's gradient row.
  void backward(std::size_t task, bool training, std::span<const T> s, std::span<const T> w,
                std::span<const T> dw) {
    T sum = 0, dot = 0;
    for (std::size_t e = 0; e < experts_; ++e) {
      sum += s[e];
      dot += dw[e] * w[e];
    }
    const T scale = training ? static_cast<T>(1.0 / temperature_) : T(1);
    T* g = grads_.data() + task * experts_;
    for (std::size_t e = 0; e < experts_; ++e)
      g[e] += (dw[e] - dot) / sum * s[e] * (T(1) - s[e]) * scale;
  }

 private:
  std::size_t tasks_, experts_;
  double temperature_;
  std::vector<T> logits_, grads_;
};

/// Latent-skill routing: example b merged by its task's allocation w = s / Σ s (sampled in
/// training; σ(a) at inference, where each task's merged expert is built once and cached); the
/// allocation learns from the exact gradient ∂ℓ/∂W = G·Θᵀ.
template <class T>
class latent_skills_planner : public planner_base<latent_skills_planner<T>, T> {
 public:
  latent_skills_planner(std::size_t experts, const strategy_options& o, rng& init)
      : n_(experts), skills_(o.tasks, experts, o.skills_temperature, o.skills_init, init) {}

  latent_skills<T>& skills() noexcept { return skills_; }
  const latent_skills<T>& skills() const noexcept { return skills_; }

  void check(const route_context<T>& c, const char* op) const override {
    detail::check_tags(c.in.tags, c.batch, skills_.tasks(), "latent_skills", " (one row per task)", op);
  }
  router_use router(const route_context<T>&) const override { return router_use::none; }
  std::size_t draws(const route_context<T>& c) const noexcept override { return c.training ? n_ : 0; }
  void plan(const route_context<T>& c, rng& gen, routing_plan<T>& out) override {
    const std::size_t B = c.batch, N = n_;
    out.reset(plan_kind::merge, B, N);
    soft_.resize(B * N);
    tags_.assign(c.in.tags.begin(), c.in.tags.end());
    if (c.training) {
      for (std::size_t b = 0; b < B; ++b)
        skills_.weights(static_cast<std::size_t>(tags_[b]), true, gen, {soft_.data() + b * N, N},
                        out.weight_matrix().row(b));
    } else {  // σ(a) per task, as a table
      const std::size_t tasks = skills_.tasks();
      out.table_rows = tasks;
      out.table.resize(tasks * N);
      row_.resize(N);
      for (std::size_t t = 0; t < tasks; ++t) skills_.weights(t, false, gen, row_, {out.table.data() + t * N, N});
      out.table_row.resize(B);
      for (std::size_t b = 0; b < B; ++b) {
        const auto r = static_cast<std::size_t>(tags_[b]);
        out.table_row[b] = static_cast<std::uint32_t>(r);
        std::copy_n(out.table.data() + r * N, N, out.weights.data() + b * N);
        for (std::size_t e = 0; e < N; ++e)  // σ(a) of the task, for a backward in evaluation mode
          soft_[b * N + e] = T(1) / (T(1) + std::exp(-skills_.logits()(r, e)));
      }
    }
    detail::argmax_rows<T>(out.weight_matrix(), out.choices);
  }
  feedback_needs needs(const routing_plan<T>&, bool) const noexcept override { return {.dweights = true}; }
  router_gradient backward(const routing_plan<T>& p, const plan_feedback<T>& fb) override {
    for (std::size_t b = 0; b < p.batch; ++b)
      skills_.backward(static_cast<std::size_t>(tags_[b]), fb.training, {soft_.data() + b * n_, n_},
                       p.weight_matrix().row(b), fb.dweights.row(b));
    return router_gradient::none;
  }
  void append_parameters(parameter_list<T>& out) override { skills_.append_parameters(out, "skills."); }
  void zero_grad() noexcept override { skills_.zero_grad(); }
  std::size_t workspace_bytes() const noexcept override {
    return planner<T>::workspace_bytes() + sizeof(T) * (soft_.capacity() + row_.capacity()) +
           sizeof(std::int32_t) * tags_.capacity();
  }

 private:
  std::size_t n_;
  latent_skills<T> skills_;
  std::vector<T> soft_, row_;  ///< [B, N] the allocation s before normalisation; a table row's
  std::vector<std::int32_t> tags_;
};

}  // namespace smear
