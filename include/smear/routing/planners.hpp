#pragma once
/// \file routing/planners.hpp
/// Every routing strategy's planner, and the one place that maps layer options to a planner.
/// A new strategy is a planner class in its own header under routing/ plus one line here.

#include <cstddef>
#include <memory>

#include "smear/layout.hpp"
#include "smear/random.hpp"
#include "smear/routing/adamix.hpp"
#include "smear/routing/cluster.hpp"
#include "smear/routing/dselect.hpp"
#include "smear/routing/ensemble.hpp"
#include "smear/routing/hash.hpp"
#include "smear/routing/latent_skills.hpp"
#include "smear/routing/planner.hpp"
#include "smear/routing/random.hpp"
#include "smear/routing/reinforce.hpp"
#include "smear/routing/smear.hpp"
#include "smear/routing/soft_moe.hpp"
#include "smear/routing/st_gumbel.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/routing/switch_gate.hpp"
#include "smear/routing/tag.hpp"

namespace smear {

/// The planner of strategy `o` (validated) for N experts with parameter layout `layout` and
/// router features of `features` values (the tokens' dimension); the planner's own parameters
/// (skills, a learned baseline, Soft MoE's Φ with standard deviation `init_std`) are drawn from
/// `init`. With one expert every strategy but Soft MoE (whose slots are not the tokens) runs it
/// as it is.
template <class T>
std::unique_ptr<planner<T>> make_planner(const strategy_options& o, std::size_t experts, const parameter_layout& layout,
                                         std::size_t features, double init_std, rng& init) {
  const std::size_t P = layout_size(layout);
  if (o.strategy == strategy::soft_moe)
    return std::make_unique<soft_moe_planner<T>>(features, experts, o.soft_slots, init_std, init);
  if (experts == 1) return std::make_unique<single_planner<T>>(P);
  switch (o.strategy) {
    case strategy::smear: return std::make_unique<smear_planner<T>>(experts);
    case strategy::ensemble: return std::make_unique<ensemble_planner<T>>(experts);
    case strategy::tag: return std::make_unique<tag_planner<T>>(experts, P);
    case strategy::hash: return std::make_unique<hash_planner<T>>(experts, P, o.hash_seed);
    case strategy::adamix: return std::make_unique<adamix_planner<T>>(experts, layout);
    case strategy::latent_skills: return std::make_unique<latent_skills_planner<T>>(experts, o, init);
    case strategy::random: return std::make_unique<random_planner<T>>(experts, P);
    case strategy::cluster: return std::make_unique<cluster_planner<T>>(experts, P, features, o, init);
    case strategy::soft_moe: break;  // above
    case strategy::top_k:
      switch (o.estimator) {
        case estimator::st_gumbel: return std::make_unique<st_gumbel_planner<T>>(experts, o.k, o.gumbel_temperature);
        case estimator::reinforce: return std::make_unique<reinforce_planner<T>>(experts, o, features, init);
        case estimator::dselect: return std::make_unique<dselect_planner<T>>(experts, o);
        case estimator::switch_gate: return std::make_unique<switch_planner<T>>(experts, o.k, o.switch_renormalize);
      }
  }
  throw value_error("make_planner: unknown strategy");
}

}  // namespace smear
