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
  /// Checked mode: before any output or gradient is written, forward() checks what it reads
  /// (the valid rows of x, every row when the router pools over all positions; the experts',
  /// the router's and the planner's tensors) and backward() the valid rows of dy and the
  /// losses, throwing numeric_error that names the tensor and the first non-finite value; such
  /// a throw changes nothing (a pending backward stays pending). A non-finite value that the
  /// computation itself produces from finite ones (an overflow) is reported after the work, as
  /// y, dx or the gradient tensor holding it.
  bool check_finite = false;
  /// The most threads of the cpu backend's pool one call of this layer uses (0: all of them;
  /// see smear/backend/cpu/thread_pool.hpp). Results depend on the count, not on the machine's
  /// load: a count gives the same numbers every run.
  std::size_t threads = 0;
};

/// Which of the official code's setups a preset follows (their annealing schedules differ).
enum class official_setup {
  t5,      ///< hyperformer/ (T5-GLUE)
  resnet,  ///< cvl/ (ResNet-DomainNet)
};

/// `o` switched to the official SMEAR code's (r-three/smear) values where smear's defaults
/// differ: plain-mean pooling, the router weight normalised without a bias; ST-Gumbel's
/// temperature annealed from 10 to at least 0.5 (rate 1e-6 every 5000 steps for T5, 1e-4
/// every 1000 for ResNet); REINFORCE with policy weight 0.01, a Huber value loss (δ = 1) and
/// entropy weight 5e-4. The official trainer adds +5e-4·H(p) to the loss (it lowers the
/// entropy), so the preset's entropy_bonus is −5e-4. Everything else in `o` is kept.
inline layer_options official_options(layer_options o, official_setup setup = official_setup::t5) {
  o.router.pool = pooling::mean;
  o.router.normalize_weights = true;
  o.router.bias = false;
  const bool t5 = setup == official_setup::t5;
  o.routing.gumbel_temperature = {.initial = 10.0, .minimum = 0.5, .rate = t5 ? 1e-6 : 1e-4,
                                  .every = t5 ? 5000u : 1000u};
  o.routing.policy_weight = 0.01;
  o.routing.value_loss = value_loss::huber;
  o.routing.huber_delta = 1.0;
  o.routing.entropy_bonus = -5e-4;
  return o;
}

/// `o` with a router as PyTorch code usually writes one: a linear map of the plain mean over
/// the `length` positions, without LayerNorm. With smear::plain_adapter_options for the
/// experts it is the "plain adapter block" preset. Everything else in `o` is kept.
inline layer_options plain_options(layer_options o = {}) {
  o.router.layer_norm = false;
  o.router.pool = pooling::mean;
  return o;
}

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
