#pragma once
/// \file routing/plan.hpp
/// What a routing strategy decides for one batch, as plain host data, and what it needs back
/// from the backward pass. Every strategy reduces to one of four kinds of work, which every
/// backend's layer (the executor) runs without knowing the strategy:
///
///   merge    Θ̄_b = Σ_e W_be θ_e for the batch (one [B, N]·[N, P] GEMM); optionally through a
///            small table of rows shared by many examples, which executors merge once and cache;
///   gather   parameter group g of example b is a copy of expert e_bg's (one group: the whole
///            vector);
///   mixture  example b runs k slots, slot j its expert e_bj with coefficient c_bj:
///            y_b = Σ_j c_bj f(x_b; θ_e_bj) (+ x_b);
///   soft     Soft MoE (smear/routing/soft_moe.hpp): per-token logits from the planner's own
///            tensors; each expert runs on s slots mixed from the tokens, each token mixes the
///            slots' outputs. The executor runs the planner's soft_moe, forward and backward, and
///            reports in `weights` each expert's mean combine weight; the planner gets no feedback.
///
/// Backward, the executor measures what the plan asks for (∂ℓ/∂W = G·Θᵀ for a merge,
/// ⟨dy_b, f(x_b; θ_e_bj)⟩ for each mixture slot, the router's features) and the planner turns it
/// into the router's gradient (smear/routing/planner.hpp).

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "smear/layout.hpp"
#include "smear/replicas.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// The kind of work a plan asks for (see the file comment).
enum class plan_kind { merge, gather, mixture, soft };

/// One batch's routing: what to merge, gather or mix, and what to report.
///
/// `by_router` means the weights of a merge, or the coefficients of a mixture over all N experts
/// (slot j = expert j), are the router's probabilities p, which the executor already holds
/// where it computed them (a GPU keeps them on the device); `weights` is then left empty and
/// `routing()` reports p. An executor may skip mixture slots whose coefficient is zero.
template <class T>
struct routing_plan {
  plan_kind kind = plan_kind::merge;
  std::size_t batch = 0;
  std::size_t experts = 0;  ///< N
  bool by_router = false;

  /// [B, N]: merge weights (unless by_router or a table is used), and in every case the
  /// distribution over experts reported by routing() (unless by_router).
  std::vector<T> weights;

  /// merge through a table: row table_row[b] of `table` ([table_rows, N]) is example b's
  /// weights; the executor merges each row once and reuses it while the parameters and the
  /// table are unchanged (the inference cache). table_rows = 0: no table.
  std::size_t table_rows = 0;
  std::vector<T> table;
  std::vector<std::uint32_t> table_row;

  /// gather: the parameter groups (one range over [0, P) for a whole expert); mixture: unused.
  std::vector<parameter_range> groups;
  /// gather [B, groups] or mixture [B, slots]: the expert of each group or slot.
  std::size_t slots = 1;
  std::vector<std::int32_t> expert;
  /// mixture [B, slots]: each slot's coefficient (unless by_router); count[b] slots are used.
  std::vector<T> coef;
  std::vector<std::size_t> count;

  /// [B, choice_cols]: the experts each example ran, for analysis; empty when by_router (the
  /// executor reports the most probable expert of p).
  std::size_t choice_cols = 1;
  std::vector<std::int32_t> choices;

  /// Regularisers backward() differentiates along with the caller's loss (batch means).
  T auxiliary_loss = T(0);

  /// Sizes the buffers for a batch of B and clears the scalars (capacity is kept).
  void reset(plan_kind k, std::size_t B, std::size_t N) {
    kind = k;
    batch = B;
    experts = N;
    by_router = false;
    table_rows = 0;
    slots = 1;
    choice_cols = 1;
    auxiliary_loss = T(0);
    weights.resize(B * N);
    choices.resize(B);
  }
  /// Sizes `expert` (and for a mixture `coef` and `count`) for `per_example` slots or groups.
  void resize_slots(std::size_t per_example) {
    slots = per_example;
    expert.resize(batch * slots);
    if (kind == plan_kind::mixture) {
      coef.resize(batch * slots);
      count.assign(batch, slots);
    }
  }
  matrix_ref<T> weight_matrix() noexcept { return {weights.data(), batch, experts}; }
  matrix_ref<const T> weight_matrix() const noexcept { return {weights.data(), batch, experts}; }
};

/// What backward() must measure for a plan, on the host.
struct feedback_needs {
  bool dweights = false;  ///< merge: ∂ℓ/∂W = G·Θᵀ, [B, N]
  bool dcoef = false;     ///< mixture: ⟨dy_b, f_j(x_b)⟩ per slot, [B, slots]
  bool features = false;  ///< the router's features (its input after the LayerNorm), [B, d]
};

/// What the executor measured in backward, in host memory (views are empty when not asked for).
template <class T>
struct plan_feedback {
  matrix_ref<const T> dweights{};
  matrix_ref<const T> dcoef{};
  matrix_ref<const T> features{};
  std::span<const T> losses{};  ///< each example's loss ([B] or empty)
  bool training = true;         ///< the mode of the forward being differentiated
  replica_group<T>* replicas = nullptr;  ///< data-parallel replicas sharing the batch, or none
};

/// Where the router's gradient comes from after a planner's backward.
enum class router_gradient {
  none,           ///< the router gets no gradient
  measured,       ///< ∂ℓ/∂p is what the executor measured: ∂ℓ/∂W of a by-router merge, or the
                  ///< slot dot products of a by-router mixture; it stays where it was measured
  probabilities,  ///< ∂ℓ/∂p [B, N], written by the planner
  logits,         ///< ∂ℓ/∂z [B, K], written by the planner
};

}  // namespace smear
