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
    out.push_back({prefix + "logits", logits_, grads_, false});
  }

  /// Writes task `task`'s allocation s (before normalisation) and weights w = s / Σ s.
  /// In training the entries are sampled with `gen`.
  void weights(std::size_t task, bool training, rng& gen, std::span<T> s, std::span<T> w) const {
    const T* a = logits_.data() + task * experts_;
    T sum = 0;
    for (std::size_t e = 0; e < experts_; ++e) {
      double t = static_cast<double>(a[e]);
      if (training) {
        double u = gen.uniform();
        while (u <= 0.0) u = gen.uniform();
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

}  // namespace smear
