#pragma once
/// \file methods.hpp
/// The methods the examples compare, by their command-line names: the routing strategies of
/// smear::parse_strategy, and two baselines without routing, "single" (one expert) and "dense"
/// (one expert N times as wide: about the parameters of N experts, the cost of one).

#include <algorithm>
#include <string>
#include <vector>

namespace examples {

/// Every method, in the order of the comparison tables.
inline const std::vector<std::string>& all_methods() {
  static const std::vector<std::string> m{"smear",    "tag",    "hash",  "st_gumbel", "reinforce",    "dselect",
                                          "ensemble", "soft_moe", "single", "dense", "adamix", "latent_skills"};
  return m;
}

/// Whether `name` is one of all_methods().
inline bool known_method(const std::string& name) {
  return std::find(all_methods().begin(), all_methods().end(), name) != all_methods().end();
}

/// "smear, tag, ..., latent_skills".
inline std::string method_list() {
  std::string out;
  for (const auto& m : all_methods()) out += (out.empty() ? "" : ", ") + m;
  return out;
}

/// Whether `name` is a baseline of one expert (single, dense): a layer of N = 1, no router.
inline bool one_expert(const std::string& name) { return name == "single" || name == "dense"; }

}  // namespace examples
