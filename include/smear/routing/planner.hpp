#pragma once
/// \file routing/planner.hpp
/// The contract of a routing strategy. A planner turns the router's outputs (or the route
/// inputs: tags, ids) into a routing_plan for the batch, and in backward turns what the executor
/// measured into the router's gradient, its own parameters' gradients and its statistics
/// (baselines). Its random draws come from the generator the layer hands it, in a fixed order,
/// so every backend draws the same samples for a seed. It never sees tensors of tokens or
/// parameters: those stay with the executor (smear::layer on the host, the cuda layer on a GPU).
///
/// Each strategy is one class under routing/, registered in routing/planners.hpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "smear/error.hpp"
#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/replicas.hpp"
#include "smear/routing/plan.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// What the router does in one forward.
enum class router_use {
  none,          ///< not run (fixed or per-task routing)
  route,         ///< pool, LayerNorm, logits, softmax
  with_dropout,  ///< the same, then expert dropout (in training, when the router's option is set)
};

/// What a planner sees of a batch. The router's outputs are filled in (host memory) before
/// plan() when reads_router() is true.
template <class T>
struct route_context {
  std::size_t batch = 0, length = 0;
  std::span<const std::int32_t> lengths{};  ///< valid tokens per example; empty: all
  route_inputs in{};
  bool training = true;
  std::uint64_t step = 0;               ///< the layer's training steps completed before this forward
  matrix_ref<const T> logits{};         ///< [B, K]: the router's logits z
  matrix_ref<const T> probabilities{};  ///< [B, N]: softmax(z / τ), after expert dropout
  T inv_temperature = T(1);             ///< 1 / τ of the router
  matrix_ref<const T> pooled{};         ///< [B, d]: each example's pooled input (planners that reads_pooled())
  replica_group<T>* replicas = nullptr; ///< data-parallel replicas sharing the batch (training only), or none

  std::size_t valid(std::size_t b) const noexcept {
    return lengths.empty() ? length : static_cast<std::size_t>(lengths[b]);
  }
};

/// A routing strategy (see the file comment). Methods are called in this order per batch:
/// check, router, plan (forward); needs, backward (backward, at most once per forward).
template <class T>
class planner {
 public:
  virtual ~planner() = default;
  virtual std::unique_ptr<planner> clone() const = 0;

  /// Throws shape_error / value_error, naming `op`, when the route inputs lack what the
  /// strategy needs for this batch.
  virtual void check(const route_context<T>&, const char* /*op*/) const {}
  /// Whether and how the router runs for this batch.
  virtual router_use router(const route_context<T>& ctx) const = 0;
  /// Whether plan() reads the router's logits and probabilities (a device executor copies them
  /// to the host for it).
  virtual bool reads_router() const noexcept { return false; }
  /// Whether plan() reads each example's pooled input (the router's pooling, nothing more),
  /// given in route_context::pooled on the host.
  virtual bool reads_pooled() const noexcept { return false; }
  /// The batch's plan; every sampled decision is drawn from `gen`, routing unit by unit.
  virtual void plan(const route_context<T>& ctx, rng& gen, routing_plan<T>& out) = 0;
  /// How many draws plan() takes from `gen` for each routing unit of this batch (the same for
  /// every unit), so data-parallel replicas can skip each other's (smear/replicas.hpp).
  virtual std::size_t draws(const route_context<T>&) const noexcept { return 0; }

  /// Whether backward() after a forward in mode `training` needs each example's loss.
  virtual bool needs_losses(bool /*training*/) const noexcept { return false; }
  /// What backward() reads on the host.
  virtual feedback_needs needs(const routing_plan<T>&, bool /*training*/) const noexcept { return {}; }
  /// From the measurements to the router's gradient: returns where it is; for probabilities
  /// and logits it is gradient(). Accumulates the planner's own parameters' gradients.
  virtual router_gradient backward(const routing_plan<T>&, const plan_feedback<T>&) {
    return router_gradient::none;
  }
  /// The router's gradient written by the last backward(), [B, N] or [B, K].
  matrix_ref<const T> gradient() const noexcept { return {grad_.data(), grad_rows_, grad_cols_}; }

  /// The planner's own trainable tensors (latent skills, a learned baseline).
  virtual void append_parameters(parameter_list<T>&) {}
  virtual void zero_grad() noexcept {}
  /// Bytes of its per-batch buffers.
  virtual std::size_t workspace_bytes() const noexcept { return sizeof(T) * grad_.capacity(); }

 protected:
  planner() = default;
  planner(const planner&) = default;
  planner& operator=(const planner&) = default;
  /// A zeroed [rows, cols] matrix for the router's gradient.
  matrix_ref<T> gradient_buffer(std::size_t rows, std::size_t cols) {
    if (grad_.size() < rows * cols) grad_.resize(rows * cols);
    std::fill_n(grad_.data(), rows * cols, T(0));
    grad_rows_ = rows;
    grad_cols_ = cols;
    return {grad_.data(), rows, cols};
  }

 private:
  std::vector<T> grad_;
  std::size_t grad_rows_ = 0, grad_cols_ = 0;
};

/// The base of each strategy's planner: clone() by copy.
template <class Derived, class T>
class planner_base : public planner<T> {
 public:
  std::unique_ptr<planner<T>> clone() const override {
    return std::make_unique<Derived>(static_cast<const Derived&>(*this));
  }
};

namespace detail {

/// Row b's most probable expert, for every row of `w` ([B, N]), into `out`.
template <class T>
void argmax_rows(matrix_ref<const T> w, std::span<std::int32_t> out) noexcept {
  for (std::size_t b = 0; b < w.rows; ++b) {
    const auto r = w.row(b);
    std::size_t best = 0;
    for (std::size_t e = 1; e < r.size(); ++e)
      if (r[e] > r[best]) best = e;
    out[b] = static_cast<std::int32_t>(best);
  }
}

/// Throws unless `in.tags` holds one tag per example, each in 0..limit−1.
inline void check_tags(std::span<const std::int32_t> tags, std::size_t B, std::size_t limit, std::string_view name,
                       const char* what, const char* op) {
  if (tags.size() != B)
    throw shape_error(message(op, ": ", name, " routing needs one tag per example, got ", tags.size(),
                              " tags for B = ", B));
  for (std::size_t b = 0; b < B; ++b)
    if (tags[b] < 0 || static_cast<std::size_t>(tags[b]) >= limit)
      throw value_error(message(op, ": example ", b, " has tag ", tags[b], ", expected 0..", limit - 1, what));
}

}  // namespace detail
}  // namespace smear
