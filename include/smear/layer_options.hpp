#pragma once
/// \file layer_options.hpp
/// The options every backend's layer takes, and the checked mode's test for NaN and ±Inf.

#include <cmath>
#include <cstddef>
#include <optional>
#include <span>

#include "smear/error.hpp"
#include "smear/routing/router.hpp"
#include "smear/routing/strategy.hpp"

namespace smear {

/// Options of a layer.
struct layer_options {
  router_options router{};        ///< pooling, LayerNorm, temperature, detaching, expert dropout
  strategy_options routing{};     ///< the strategy (default: smear) and its options
  std::optional<bool> residual{}; ///< add the input to the output; default: the expert's `residual`
  bool check_finite = false;      ///< checked mode: throw numeric_error naming a tensor with NaN/Inf
};

namespace detail {

/// Throws numeric_error naming `what` and the first index holding NaN or ±Inf.
template <class T>
void check_finite(std::span<const T> v, const char* op, const char* what) {
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      throw numeric_error(message(op, ": ", what, " holds ", v[i], " at flat index ", i, " of ", v.size()));
}

}  // namespace detail
}  // namespace smear
