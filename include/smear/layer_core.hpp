#pragma once
/// \file layer_core.hpp
/// What every backend's routing block shares: the experts' bank and the router (on the host:
/// the parameters themselves; for a device layer: their host mirrors), the strategy's planner,
/// the options, the mode and the generator behind every sampled decision, the plan of the last
/// forward, and the checks at the public entry points. A backend's layer (smear::layer, the
/// cuda layer) derives from it and only executes plans.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "smear/bank.hpp"
#include "smear/concepts.hpp"
#include "smear/description.hpp"
#include "smear/error.hpp"
#include "smear/layer_options.hpp"
#include "smear/random.hpp"
#include "smear/routing/planners.hpp"
#include "smear/routing/router.hpp"
#include "smear/tensor.hpp"

namespace smear {
namespace detail {

/// A process-wide source of parameter versions (see layer_core::touch()).
inline std::uint64_t next_parameter_version() noexcept {
  static std::atomic<std::uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

/// A counter that threads may increment at once, copied by value.
class relaxed_counter {
 public:
  relaxed_counter() = default;
  relaxed_counter(const relaxed_counter& o) noexcept : n_(o.value()) {}
  relaxed_counter& operator=(const relaxed_counter& o) noexcept {
    n_.store(o.value(), std::memory_order_relaxed);
    return *this;
  }
  relaxed_counter& operator++() noexcept {
    n_.fetch_add(1, std::memory_order_relaxed);
    return *this;
  }
  std::size_t value() const noexcept { return n_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::size_t> n_{0};
};

}  // namespace detail

/// The routing block of N experts run by `Backend`: smear/layer.hpp defines it for the host
/// backends (reference, cpu), smear/cuda/layer.hpp for the cuda backend.
template <class Expert, std::size_t N, class Backend = default_backend>
class layer;

template <class Expert, std::size_t N>
class layer_core {
  static_assert(detail::diagnose_mergeable_expert<Expert>());
  static_assert(N >= 1, "smear::layer: the number of experts N must be at least 1");

 public:
  using expert_type = Expert;
  using value_type = typename Expert::value_type;
  using T = value_type;
  static constexpr std::size_t experts = N;

  const Expert& expert() const noexcept { return bank_.expert(); }
  std::size_t input_dim() const noexcept { return bank_.expert().input_dim(); }
  std::size_t output_dim() const noexcept { return bank_.expert().output_dim(); }
  bool residual() const noexcept { return residual_; }
  const layer_options& options() const noexcept { return opt_; }
  const strategy_options& strategy() const noexcept { return opt_.routing; }
  /// Whether a learned router decides the routing (smear, ensemble, top-k).
  bool uses_router() const noexcept { return has_router(opt_.routing); }

  /// The latent-skill allocation; throws state_error under another strategy.
  latent_skills<T>& skills() {
    touch();
    return planner_as<latent_skills_planner<T>>("layer::skills: the strategy is not latent_skills").skills();
  }
  const latent_skills<T>& skills() const {
    return planner_as<latent_skills_planner<T>>("layer::skills: the strategy is not latent_skills").skills();
  }
  /// REINFORCE's baseline; throws state_error under another estimator.
  reinforce_baseline<T>& baseline() {
    touch();
    return planner_as<reinforce_planner<T>>("layer::baseline: the estimator is not reinforce").baseline();
  }
  const reinforce_baseline<T>& baseline() const {
    return planner_as<reinforce_planner<T>>("layer::baseline: the estimator is not reinforce").baseline();
  }

  /// Cluster routing's centres, [N, d]; throws state_error under another strategy.
  matrix_ref<T> cluster_centres() {
    touch();
    return planner_as<cluster_planner<T>>("layer::cluster_centres: the strategy is not cluster").centres();
  }
  matrix_ref<const T> cluster_centres() const {
    return planner_as<cluster_planner<T>>("layer::cluster_centres: the strategy is not cluster").centres();
  }

  /// Soft MoE's tensors (Φ and scale); throws state_error under another strategy.
  smear::soft_moe<T>& soft_moe() {
    touch();
    return soft_moe_of(*planner_);
  }
  const smear::soft_moe<T>& soft_moe() const { return soft_moe_of(*planner_); }

  /// Makes the layer one of data-parallel replicas sharing each batch (smear/replicas.hpp;
  /// smear::mpi::data_parallel is one): in training, its forwards draw what a run of the whole
  /// global batch draws for this process's examples and its strategies' batch statistics cover
  /// the global batch. `group` must outlive the layer's use of it; nullptr: alone again.
  void set_replicas(replica_group<T>* group) noexcept { replicas_ = group; }
  replica_group<T>* replicas() const noexcept { return replicas_; }

  /// Restarts the generator behind every sampled decision (expert dropout, Gumbel noise,
  /// REINFORCE's and AdaMix's draws, relaxed Bernoulli skills) from `seed`.
  void reseed(std::uint64_t seed) noexcept { gen_ = rng{seed}; }

  /// Training mode samples (dropout, Gumbel, REINFORCE, AdaMix, skills); evaluation takes the
  /// argmax / top-k, the average, or σ(logits). Default: training.
  void train(bool on = true) noexcept {
    training_ = on;
    touch();
  }
  bool training() const noexcept { return training_; }

  /// SMEAR at inference with a fixed distribution per task: row t of `p` ([tasks, N], rows
  /// summing to 1) routes every example with tag t, merged once and cached. Used in evaluation
  /// mode when forward() gets tags. Throws state_error under another strategy, shape_error /
  /// value_error for a bad matrix.
  void set_task_routing(matrix_ref<const T> p) {
    planner_as<smear_planner<T>>("layer::set_task_routing: only the smear strategy routes by a per-task "
                                 "distribution")
        .set_task_routing(p);
    touch();
  }
  void clear_task_routing() noexcept {
    if (auto* s = dynamic_cast<smear_planner<T>*>(planner_.get())) s->clear_task_routing();
    touch();
  }
  /// Ends the validity of merged experts cached for inference.
  void invalidate_cache() noexcept { touch(); }
  /// How many times the inference cache has been (re)built.
  std::size_t cache_builds() const noexcept { return cache_builds_.value(); }

  /// Training steps completed: backward() calls after a forward in training mode. Schedules
  /// (the ST-Gumbel temperature) read it; checkpoints save and restore it.
  std::uint64_t training_steps() const noexcept { return steps_; }
  /// Sets the count, to resume a run (smear::load does it from a checkpoint).
  void set_training_steps(std::uint64_t steps) noexcept { steps_ = steps; }

  /// What the layer computes, as checkpoints record it: the expert's description (its
  /// describe(), else its parameter layout), N, the residual, the strategy's options that
  /// change what it computes or what its tensors mean, and the router's when it has one.
  /// Options that only shape training (dropout, momenta, loss weights, initialisation) are
  /// left out, so a run may change them on resume.
  description describe() const {
    description d;
    const Expert& ex = bank_.expert();
    if constexpr (requires(description& out) { ex.describe(out); }) {
      ex.describe(d);
    } else {
      std::string layout;
      for (const auto& slot : bank_.layout()) {
        layout += (layout.empty() ? "" : ",") + slot.name;
        for (std::size_t i = 0; i < slot.shape.size(); ++i)
          layout += (i == 0 ? "[" : "x") + std::to_string(slot.shape[i]);
        layout += slot.shape.empty() ? "[]" : "]";
      }
      d.add("expert.input_dim", ex.input_dim()).add("expert.output_dim", ex.output_dim()).add("expert.layout", layout);
    }
    d.add("experts", N).add("residual", residual_);
    const strategy_options& s = opt_.routing;
    d.add("strategy", to_string(s.strategy));
    if (s.strategy == strategy::top_k) {
      d.add("top_k.k", s.k).add("top_k.estimator", to_string(s.estimator));
      if (s.estimator == estimator::switch_gate) d.add("top_k.switch_renormalize", s.switch_renormalize);
      if (s.estimator == estimator::dselect) d.add("top_k.dselect_gamma", s.dselect_gamma);
      if (s.estimator == estimator::reinforce && s.baseline == baseline::learned)
        d.add("top_k.baseline_hidden", s.baseline_hidden);
    }
    if (s.strategy == strategy::latent_skills) d.add("latent_skills.tasks", s.tasks);
    if (s.strategy == strategy::hash) d.add("hash.seed", s.hash_seed);
    if (s.strategy == strategy::soft_moe) d.add("soft_moe.slots", s.soft_slots);
    if (uses_router()) {
      const router_options& r = router_.options();
      d.add("router.pool", r.pool == pooling::mean ? "mean" : "masked_mean").add("router.layer_norm", r.layer_norm);
      if (r.layer_norm) d.add("router.layer_norm_eps", r.layer_norm_eps);
      d.add("router.temperature", r.temperature).add("router.normalize_weights", r.normalize_weights);
      d.add("router.bias", r.bias);
      if (r.segment_length > 0) d.add("router.segment_length", r.segment_length);
    }
    return d;
  }

  /// The regularisers backward() differentiates along with the caller's loss, as a batch
  /// mean: DSelect-k's selection entropy and unused-code penalty, REINFORCE's −bonus·H(p).
  T auxiliary_loss() const noexcept { return plan_.auxiliary_loss; }

 protected:
  /// A block of N experts shaped like `prototype`, initialised from `seed`. Throws value_error
  /// for an invalid option, or when residual is asked for an expert whose input and output
  /// dimensions differ.
  layer_core(Expert prototype, const layer_options& options, std::uint64_t seed)
      : bank_(std::move(prototype)),
        router_(bank_.expert().input_dim(), router_outputs(options.routing, N), options.router,
                seed ^ 0x5EED0F5EA4ull),
        opt_(options),
        residual_(options.residual.value_or(is_residual_expert<Expert>)),
        gen_(seed) {
    validate(opt_.routing, N);
    if (opt_.router.segment_length > 0 && !has_router(opt_.routing))
      throw value_error(detail::message("layer: causal segment routing routes each segment by the router on the "
                                        "previous one; strategy ", to_string(opt_.routing.strategy),
                                        " has no router (use smear, ensemble or top_k)"));
    if (opt_.router.segment_length > 0 && !is_row_wise_expert<Expert>)
      throw value_error("layer: causal segment routing splits examples into segments of tokens; the expert does "
                        "not act on each token alone (a conv adapter needs whole maps)");
    if (opt_.routing.strategy == strategy::soft_moe && !is_row_wise_expert<Expert>)
      throw value_error("layer: soft_moe runs each expert on slots mixed from all of an example's tokens, so the "
                        "expert must act on each token alone (adapter, lora, linear: row_wise); this one does not");
    if (residual_ && bank_.expert().input_dim() != bank_.expert().output_dim())
      throw value_error(detail::message("layer: residual needs input_dim == output_dim, the expert has ",
                                        bank_.expert().input_dim(), " -> ", bank_.expert().output_dim()));
    rng init{seed};
    bank_.initialize(init);
    rng extra{seed ^ 0xA11CA7E5ull};
    planner_ = make_planner<T>(opt_.routing, N, bank_.layout(), input_dim(), options.router.init_std, extra);
  }
  layer_core(const layer_core& o)
      : bank_(o.bank_), router_(o.router_), opt_(o.opt_), residual_(o.residual_), training_(o.training_),
        was_training_(o.was_training_), gen_(o.gen_), planner_(o.planner_->clone()), plan_(o.plan_), last_(o.last_),
        pending_backward_(o.pending_backward_), version_(o.version_), cache_builds_(o.cache_builds_),
        steps_(o.steps_), replicas_(o.replicas_) {}
  layer_core& operator=(const layer_core& o) {
    if (this != &o) *this = layer_core(o);
    return *this;
  }
  layer_core(layer_core&&) noexcept = default;
  layer_core& operator=(layer_core&&) noexcept = default;
  ~layer_core() = default;

  /// Checks a forward's arguments before any work (shapes, lengths, what the strategy needs)
  /// and returns the planner's view of the batch. `y_size` is the output's length.
  route_context<T> check_forward(tokens<const T> x, std::size_t y_size, const route_inputs& in,
                                 const char* op) const {
    const auto shape = detail::shape(x.batch, x.length, x.dim);
    if (x.batch == 0 || x.length == 0)
      throw value_error(detail::message(op, ": empty batch, x is [B, L, d] = ", shape));
    if (x.data == nullptr) throw value_error(detail::message(op, ": x has no data"));
    if (x.dim != input_dim())
      throw shape_error(detail::message(op, ": x is [B, L, d] = ", shape, ", the experts expect d = ", input_dim()));
    detail::checked_elements(op, "x [B, L, d] =", sizeof(T), x.batch, x.length, x.dim);
    const std::size_t y_expected = detail::checked_elements(op, "y [B, L, d_out] =", sizeof(T), x.batch, x.length,
                                                            output_dim());
    if (!x.lengths.empty()) {
      if (x.lengths.size() != x.batch)
        throw shape_error(detail::message(op, ": lengths has ", x.lengths.size(), " entries, expected B = ",
                                          x.batch, " (x is ", shape, ")"));
      for (std::size_t b = 0; b < x.batch; ++b)
        if (x.lengths[b] < 1 || static_cast<std::size_t>(x.lengths[b]) > x.length)
          throw value_error(detail::message(op, ": example ", b, " has length ", x.lengths[b],
                                            ", expected 1..L = 1..", x.length,
                                            " (an all-padding example cannot be routed)"));
    }
    if (y_size != y_expected)
      throw shape_error(detail::message(op, ": y has ", y_size, " values, expected [B, L, d_out] = ",
                                        detail::shape(x.batch, x.length, output_dim())));
    if (const std::size_t seg = router_.options().segment_length; seg > 0 && x.length % seg != 0)
      throw shape_error(detail::message(op, ": x is [B, L, d] = ", shape, "; segment routing needs L to be a ",
                                        "multiple of the segment length ", seg));
    route_context<T> c{.batch = x.batch, .length = x.length, .lengths = x.lengths, .in = in, .training = training_,
                       .step = steps_};
    c.inv_temperature = static_cast<T>(1.0 / router_.options().temperature);
    if (training_ && replicas_ != nullptr) {
      if (replicas_->first() + x.batch > replicas_->total())
        throw value_error(detail::message(op, ": this replica's B = ", x.batch, " examples from example ",
                                          replicas_->first(), " do not fit the replicas' global batch of ",
                                          replicas_->total(), " (start each step's batch in the replica group)"));
      c.replicas = replicas_;
    }
    planner_->check(c, op);
    return c;
  }
  /// A checked forward starts: the previous one can no longer be gone back through. A forward
  /// in training mode may update the planner's state (cluster centres), so cached merges end.
  void begin_forward() noexcept {
    pending_backward_ = false;
    was_training_ = training_;
    if (training_) touch();
  }
  /// Plans the batch (`units_per_example` routing units per example) once the router's outputs
  /// (when the planner reads them) are in `c`.
  void make_plan(const route_context<T>& c, std::size_t units_per_example) {
    draw_for_replicas(c, units_per_example, planner_->draws(c), gen_, [&] { planner_->plan(c, gen_, plan_); });
  }
  /// Runs `draw`, which takes `per_unit` draws from `gen` for each of the c.batch routing units
  /// (`units_per_example` per example), between skips of the draws the other replicas' units
  /// take before and after this process's (smear/replicas.hpp), so every replica's generator
  /// moves as one run of the global batch would move it.
  template <class Draw>
  static void draw_for_replicas(const route_context<T>& c, std::size_t units_per_example, std::size_t per_unit,
                                rng& gen, Draw&& draw) {
    if (c.replicas == nullptr || per_unit == 0) return draw();
    const std::size_t first = c.replicas->first() * units_per_example;
    gen.discard(first * per_unit);
    draw();
    gen.discard((c.replicas->total() * units_per_example - first - c.batch) * per_unit);
  }
  /// Records a completed forward of `x`, so backward() may follow.
  void end_forward(tokens<const T> x) noexcept {
    last_ = x;
    pending_backward_ = true;
  }

  /// What seeing a batch by its routing units needs (causal segment routing; see
  /// router_options::segment_length): the units' lengths, and the per-example route inputs and
  /// losses repeated for each unit.
  struct unit_buffers {
    std::vector<std::int32_t> lengths, tags;
    std::vector<std::uint64_t> ids;
    std::vector<T> losses;
    std::size_t bytes() const noexcept {
      return sizeof(std::int32_t) * (lengths.capacity() + tags.capacity()) +
             sizeof(std::uint64_t) * ids.capacity() + sizeof(T) * losses.capacity();
    }
  };
  /// The routing units of `x` (x itself without segment routing), into `ub`.
  tokens<const T> units(tokens<const T> x, unit_buffers& ub) const {
    return segment_units(x, router_.options().segment_length, ub.lengths);
  }
  /// The same, with the planner's view `c` of x turned into its view of the units (token ids,
  /// [B, L], are already [B·S, ℓ]).
  tokens<const T> units(tokens<const T> x, route_context<T>& c, unit_buffers& ub) const {
    const tokens<const T> u = units(x, ub);
    const std::size_t S = u.batch / x.batch;
    c.batch = u.batch;
    c.length = u.length;
    c.lengths = u.lengths;
    c.in.tags = repeat_per_unit(c.in.tags, S, ub.tags);
    c.in.example_ids = repeat_per_unit(c.in.example_ids, S, ub.ids);
    return u;
  }

  /// Checks a backward's arguments against the last forward, before any work.
  void check_backward(std::size_t dy_size, std::size_t dx_size, std::span<const T> losses, const char* op) const {
    if (!pending_backward_)
      throw state_error(detail::message(op, ": no forward to go back through (backward runs once per forward)"));
    const tokens<const T> x = last_;
    if (dy_size != x.batch * x.length * output_dim())
      throw shape_error(detail::message(op, ": dy has ", dy_size, " values, expected [B, L, d_out] = ",
                                        detail::shape(x.batch, x.length, output_dim())));
    if (dx_size != x.size())
      throw shape_error(detail::message(op, ": dx has ", dx_size, " values, expected [B, L, d_in] = ",
                                        detail::shape(x.batch, x.length, input_dim())));
    if (planner_->needs_losses(was_training_) && losses.empty())
      throw value_error(detail::message(op, ": ", to_string(opt_.routing.estimator),
                                        " needs each example's loss: call backward(dy, dx, losses) with B = ",
                                        x.batch, " losses"));
    if (!losses.empty() && losses.size() != x.batch)
      throw shape_error(detail::message(op, ": example_losses has ", losses.size(), " values, expected B = ", x.batch));
  }
  /// What the planner's backward gets before the executor's measurements: the losses per
  /// routing unit, the forward's mode and, in training, the replicas.
  plan_feedback<T> feedback(std::span<const T> unit_losses) const noexcept {
    return {.losses = unit_losses, .training = was_training_, .replicas = was_training_ ? replicas_ : nullptr};
  }
  /// A checked backward starts: it is the last forward's only one, and it changes parameters.
  void begin_backward() noexcept {
    pending_backward_ = false;
    touch();
    if (was_training_) ++steps_;
  }

  /// Parameters may have changed: cached merged experts are no longer valid. Versions are
  /// unique across all layers, so a version names one state of one layer's parameters (a
  /// copy shares it until either changes).
  void touch() noexcept { version_ = detail::next_parameter_version(); }
  /// Whether a cache built at `version` from `table` is still valid for plan_.
  bool cache_valid(std::uint64_t built_at, std::span<const T> table) const noexcept {
    return built_at == version_ && std::equal(table.begin(), table.end(), plan_.table.begin(), plan_.table.end());
  }

  expert_bank<Expert, N> bank_;
  smear::router<T> router_;
  layer_options opt_;
  bool residual_;
  bool training_ = true, was_training_ = true;
  rng gen_;
  std::unique_ptr<planner<T>> planner_;
  routing_plan<T> plan_;
  tokens<const T> last_{};
  bool pending_backward_ = false;
  std::uint64_t version_ = detail::next_parameter_version();
  mutable detail::relaxed_counter cache_builds_;
  std::uint64_t steps_ = 0;  ///< training steps completed (see training_steps())
  replica_group<T>* replicas_ = nullptr;  ///< data-parallel replicas sharing each batch (set_replicas)

 private:
  template <class P>
  P& planner_as(const char* error) const {
    auto* p = dynamic_cast<P*>(planner_.get());
    if (p == nullptr) throw state_error(error);
    return *p;
  }
};

}  // namespace smear
