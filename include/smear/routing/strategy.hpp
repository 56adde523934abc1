#pragma once
/// \file routing/strategy.hpp
/// The routing strategies the SMEAR paper compares, chosen by one run-time option of a layer.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "smear/error.hpp"

namespace smear {

/// How a layer combines its experts.
enum class strategy {
  smear,          ///< merge the experts' parameters by the router's p (the paper's method)
  ensemble,       ///< y = Σ_e p_e f(x; θ_e): exact gradients, N times the cost
  top_k,          ///< run the k chosen experts; the router learns through an `estimator`
  tag,            ///< expert = the example's tag (task or domain id); no router
  hash,           ///< expert = a fixed seeded hash of the example; no router
  adamix,         ///< training: a random expert per example (per parameter group); inference: the average
  latent_skills,  ///< a learned task × expert allocation (relaxed Bernoulli), merged per task
  random,         ///< expert = a uniform draw per example, every forward; no router
  cluster,        ///< expert = the nearest (cosine) of N online k-means centres of the pooled inputs; no router
  soft_moe,       ///< Soft MoE (the official code's soft_input_routing): each expert runs on s slots, each slot
                  ///< a softmax-over-tokens mix of the example's tokens; each token mixes the slots' outputs;
                  ///< per-token logits from its own parameters (no router); experts that act per token only
};

/// The gradient estimator of top-k routing.
enum class estimator {
  st_gumbel,  ///< straight-through Gumbel-softmax: hard top-k forward, gradients through the relaxed
              ///< sample s = softmax((z + Gumbel) / τ), τ = the router's temperature or the
              ///< gumbel_temperature schedule at the layer's training step
  reinforce,  ///< score function with a baseline; needs each example's loss in backward()
  dselect,    ///< DSelect-k: smooth-step gates over the experts' binary codes (k = 1)
  switch_gate,  ///< the official code's "switch": the top k of p, outputs scaled by their
                ///< probabilities, so the router's gradient is exact (no estimator)
};

/// The baseline REINFORCE subtracts from each example's loss.
enum class baseline {
  moving_average,  ///< exponential moving average of the per-example loss
  learned,         ///< a linear–linear net on the (detached) router features, trained to predict the loss
};

/// The loss a learned REINFORCE baseline is trained with, on r = prediction − loss.
enum class value_loss {
  squared,  ///< mean_b r_b²
  huber,    ///< mean_b of r²/2 for |r| ≤ δ, δ·(|r| − δ/2) beyond (the official code's, δ = 1)
};

/// A temperature annealed with the layer's training steps g, as the official code anneals its
/// Gumbel-softmax temperature: at the start of each step g with (g + 1) divisible by `every`,
/// τ ← max(τ·exp(−rate·g), minimum), from τ = initial. With initial = 0 the schedule is off.
struct temperature_schedule {
  double initial = 0.0;     ///< τ₀; 0: no schedule (the router's temperature, fixed)
  double minimum = 0.5;     ///< τ_min
  double rate = 0.0;        ///< r
  std::uint64_t every = 1;  ///< K

  bool enabled() const noexcept { return initial > 0.0; }
  /// τ for the forward of step g: max(τ₀·exp(−r·Σ_{j ≤ g, K | j+1} j), τ_min), the closed form
  /// of the update above (the sum is K·n(n+1)/2 − n for n = ⌊(g+1)/K⌋).
  double at(std::uint64_t step) const noexcept {
    const double n = static_cast<double>((step + 1) / every), k = static_cast<double>(every);
    return std::max(initial * std::exp(-rate * (k * n * (n + 1) / 2 - n)), minimum);
  }
};

/// Strategy options; the defaults follow the official SMEAR code where it has one.
struct strategy_options {
  smear::strategy strategy = smear::strategy::smear;
  std::size_t k = 1;                                    ///< top_k: experts run per example (ST-Gumbel: any k ≤ N)
  smear::estimator estimator = smear::estimator::st_gumbel;
  temperature_schedule gumbel_temperature{};            ///< st_gumbel: τ of s, annealed (off: the router's τ)
  smear::baseline baseline = smear::baseline::moving_average;
  double baseline_momentum = 0.99;                      ///< moving-average baseline
  std::size_t baseline_hidden = 16;                     ///< learned baseline width
  double entropy_bonus = 0.0;                           ///< REINFORCE: add −bonus·H(p) to the loss (< 0 lowers H)
  double policy_weight = 1.0;                           ///< REINFORCE: weight of the score-function term
  smear::value_loss value_loss = smear::value_loss::squared;  ///< learned baseline's training loss
  double huber_delta = 1.0;                             ///< value_loss::huber: δ
  double dselect_gamma = 1.0;                           ///< DSelect-k smooth-step width γ
  double dselect_entropy = 0.0;                         ///< DSelect-k: weight of the entropy of the selection
  double dselect_unused_penalty = 1.0;                  ///< DSelect-k: weight of the mass on codes ≥ N
  std::size_t tasks = 0;                                ///< latent_skills: number of tasks (tags)
  double skills_temperature = 1.0;                      ///< latent_skills: relaxed Bernoulli temperature
  double skills_init = 1e-3;                            ///< latent_skills: logits start in U(−init, init)
  std::uint64_t hash_seed = 0;                          ///< hash routing
  bool switch_renormalize = false;                      ///< switch_gate: scale by p_j / Σ_chosen p
  double cluster_momentum = 0.1;                        ///< cluster: c ← (1 − m)·c + m·mean of its members
  double cluster_init_scale = 1.0;                      ///< cluster: centres start as N(0, scale²)
  std::size_t soft_slots = 1;                           ///< soft_moe: slots per expert s (the official default: 1)
};

/// Per-batch inputs some strategies need.
struct route_inputs {
  std::span<const std::int32_t> tags{};         ///< [B] task/domain ids (tag, latent_skills, task routing)
  std::span<const std::int32_t> token_ids{};    ///< [B, L] token ids (hash routing)
  std::span<const std::uint64_t> example_ids{}; ///< [B] stable ids (hash routing without token ids)
};

constexpr std::string_view to_string(strategy s) noexcept {
  switch (s) {
    case strategy::smear: return "smear";
    case strategy::ensemble: return "ensemble";
    case strategy::top_k: return "top_k";
    case strategy::tag: return "tag";
    case strategy::hash: return "hash";
    case strategy::adamix: return "adamix";
    case strategy::latent_skills: return "latent_skills";
    case strategy::random: return "random";
    case strategy::cluster: return "cluster";
    case strategy::soft_moe: return "soft_moe";
  }
  return "?";
}

constexpr std::string_view to_string(estimator e) noexcept {
  switch (e) {
    case estimator::st_gumbel: return "st_gumbel";
    case estimator::reinforce: return "reinforce";
    case estimator::dselect: return "dselect";
    case estimator::switch_gate: return "switch";
  }
  return "?";
}

/// Parses the names used on command lines: smear, ensemble, tag, hash, adamix, latent_skills,
/// random, cluster, soft_moe, st_gumbel, reinforce, dselect, switch (the last four are top-1 with that
/// estimator). Throws
/// value_error listing the names otherwise.
inline strategy_options parse_strategy(std::string_view name) {
  strategy_options o;
  for (auto s : {strategy::smear, strategy::ensemble, strategy::tag, strategy::hash, strategy::adamix,
                 strategy::latent_skills, strategy::random, strategy::cluster, strategy::soft_moe})
    if (name == to_string(s)) {
      o.strategy = s;
      return o;
    }
  for (auto e : {estimator::st_gumbel, estimator::reinforce, estimator::dselect, estimator::switch_gate})
    if (name == to_string(e)) {
      o.strategy = strategy::top_k;
      o.estimator = e;
      return o;
    }
  throw value_error(detail::message("unknown strategy '", name,
                                    "'; known: smear, ensemble, st_gumbel, reinforce, dselect, switch, tag, "
                                    "hash, adamix, latent_skills, random, cluster, soft_moe"));
}

/// ⌈log₂ n⌉ for n ≥ 1 (at least 1): the number of DSelect-k gates for n experts.
constexpr std::size_t ceil_log2(std::size_t n) noexcept {
  std::size_t b = 0;
  while ((std::size_t{1} << b) < n) ++b;
  return b == 0 ? 1 : b;
}

/// Whether the strategy has a learned router (smear, ensemble, top-k), whose tensors are then
/// among a layer's parameters. Soft MoE has none: its per-token logits come from its own
/// tensors (smear/routing/soft_moe.hpp).
constexpr bool has_router(const strategy_options& o) noexcept {
  return o.strategy == strategy::smear || o.strategy == strategy::ensemble || o.strategy == strategy::top_k;
}

/// How many outputs the router has for N experts: ⌈log₂ N⌉ gate logits for DSelect-k, else N.
constexpr std::size_t router_outputs(const strategy_options& o, std::size_t experts) noexcept {
  return o.strategy == strategy::top_k && o.estimator == estimator::dselect ? ceil_log2(experts) : experts;
}

/// Throws value_error when an option is outside its domain for N experts.
inline void validate(const strategy_options& o, std::size_t experts) {
  if (o.strategy == strategy::top_k) {
    if (o.k < 1 || o.k > experts)
      throw value_error(detail::message("top_k: k must be in 1..N = 1..", experts, ", got ", o.k));
    if ((o.estimator == estimator::reinforce || o.estimator == estimator::dselect) && o.k != 1)
      throw value_error(detail::message("top_k: ", to_string(o.estimator),
                                        " is implemented for k = 1, got k = ", o.k));
    if (!(o.baseline_momentum >= 0.0 && o.baseline_momentum < 1.0))
      throw value_error(detail::message("top_k: baseline_momentum must be in [0, 1), got ",
                                        o.baseline_momentum));
    if (o.baseline == baseline::learned && o.baseline_hidden == 0)
      throw value_error("top_k: baseline_hidden must be positive");
    if (!std::isfinite(o.entropy_bonus))
      throw value_error(detail::message("top_k: entropy_bonus must be finite, got ", o.entropy_bonus));
    if (!(o.policy_weight >= 0.0) || !std::isfinite(o.policy_weight))
      throw value_error(detail::message("top_k: policy_weight must be finite and non-negative, got ", o.policy_weight));
    if (o.value_loss == value_loss::huber && !(o.huber_delta > 0.0))
      throw value_error(detail::message("top_k: huber_delta must be positive, got ", o.huber_delta));
    if (const auto& g = o.gumbel_temperature; g.enabled()) {
      if (!std::isfinite(g.initial) || !(g.minimum > 0.0) || !(g.rate >= 0.0) || !std::isfinite(g.rate) || g.every == 0)
        throw value_error(detail::message("top_k: gumbel_temperature needs a finite initial > 0, minimum > 0, a finite "
                                          "rate >= 0 and every >= 1; got initial ", g.initial, ", minimum ", g.minimum,
                                          ", rate ", g.rate, ", every ", g.every));
    }
    if (!(o.dselect_gamma > 0.0))
      throw value_error(detail::message("top_k: dselect_gamma must be positive, got ", o.dselect_gamma));
  }
  if (o.strategy == strategy::cluster &&
      (!(o.cluster_momentum >= 0.0 && o.cluster_momentum <= 1.0) || !(o.cluster_init_scale > 0.0) ||
       !std::isfinite(o.cluster_init_scale)))
    throw value_error(detail::message("cluster: cluster_momentum must be in [0, 1] and cluster_init_scale positive, got ",
                                      o.cluster_momentum, " and ", o.cluster_init_scale));
  if (o.strategy == strategy::soft_moe && o.soft_slots < 1)
    throw value_error("soft_moe: soft_slots (slots per expert) must be at least 1, got 0");
  if (o.strategy == strategy::latent_skills) {
    if (o.tasks == 0) throw value_error("latent_skills: set strategy_options::tasks to the number of tasks");
    if (!(o.skills_temperature > 0.0))
      throw value_error(detail::message("latent_skills: skills_temperature must be positive, got ",
                                        o.skills_temperature));
  }
}

}  // namespace smear
