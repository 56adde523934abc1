#pragma once
/// \file layer.hpp
/// A routing block of N experts under one of the strategies the SMEAR paper compares
/// (smear/routing/strategy.hpp). SMEAR itself routes each example, merges the experts'
/// parameters by the routing probabilities in one GEMM and runs each example through its
/// merged expert; the other strategies share the same interface.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "smear/bank.hpp"
#include "smear/concepts.hpp"
#include "smear/error.hpp"
#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/routing/baseline.hpp"
#include "smear/routing/estimators.hpp"
#include "smear/routing/hash.hpp"
#include "smear/routing/latent_skills.hpp"
#include "smear/routing/router.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/tensor.hpp"

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
      throw numeric_error(message(op, ": ", what, " holds ", v[i], " at flat index ", i, " of ",
                                  v.size()));
}

}  // namespace detail

/// A routing block of N experts of type `Expert`, run by `Backend`, combined by the strategy
/// in `layer_options::routing` (SMEAR by default).
///
/// SMEAR, per example b with pooled input h_b: p_b = softmax(router(h_b) / τ),
/// θ̄_b = Σ_e p_be θ_e (one [B, N]·[N, P] GEMM for the batch), y_b = f(x_b; θ̄_b) (+ x_b when
/// residual). Backward follows DESIGN.md §1: the expert's backward gives ∂ℓ/∂x and
/// G_b = ∂ℓ/∂θ̄_b; then ∂ℓ/∂Θ += Pᵀ·G and ∂ℓ/∂P = G·Θᵀ (two GEMMs) feed the router.
///
/// The other strategies: latent skills merge the same way with a learned per-task allocation,
/// AdaMix gathers one random expert per parameter group (the plain average at inference), tag
/// and hash routing run one fixed expert, the ensemble and top-k routing run the chosen experts
/// separately and mix their outputs. A single expert and a parameter-matched dense adapter are
/// `layer<E, 1>` (with `adapter{d, N·m}` for the dense one), which runs its one expert
/// directly: no router, no merge.
///
/// Inference cache: in evaluation mode, strategies whose routing depends on the example's task
/// only (latent skills, AdaMix, SMEAR after set_task_routing()) merge once per task and reuse
/// the merged experts until a parameter may have changed: backward(), train(), parameters(),
/// the non-const bank()/router()/skills() accessors and invalidate_cache() all end its validity.
/// Call invalidate_cache() after writing parameters through spans obtained earlier.
///
/// Inputs are read in place: `x` must stay alive and unchanged from forward() to backward().
/// Buffers are sized at the first call with a given (B, L) and strategy path and reused: after
/// that, calls at the same or a smaller shape do not allocate.
///
/// Example:
/// ```
/// smear::layer<smear::adapter<float>, 8> block{smear::adapter<float>{768, 24}, {}, 42};
/// block.forward(smear::make_tokens(x.data(), B, L, 768, lengths), y);
/// block.backward(dy, dx);   // accumulates into the parameters' gradients
/// ```
template <class Expert, std::size_t N, class Backend = default_backend>
class layer {
  static_assert(detail::diagnose_mergeable_expert<Expert>());
  static_assert(N >= 1, "smear::layer: the number of experts N must be at least 1");

 public:
  using expert_type = Expert;
  using backend_type = Backend;
  using value_type = typename Expert::value_type;
  using T = value_type;
  static constexpr std::size_t experts = N;

  /// A block of N experts shaped like `prototype`, initialised from `seed`. Throws value_error
  /// for an invalid option, or when residual is asked for an expert whose input and output
  /// dimensions differ.
  explicit layer(Expert prototype, layer_options options = {}, std::uint64_t seed = 0)
      : bank_(std::move(prototype)),
        router_(bank_.expert().input_dim(), router_outputs(options.routing), options.router,
                seed ^ 0x5EED0F5EA4ull),
        opt_(options),
        residual_(options.residual.value_or(is_residual_expert<Expert>)),
        gen_(seed) {
    validate(opt_.routing, N);
    if (residual_ && bank_.expert().input_dim() != bank_.expert().output_dim())
      throw value_error(detail::message(
          "layer: residual needs input_dim == output_dim, the expert has ",
          bank_.expert().input_dim(), " -> ", bank_.expert().output_dim()));
    rng init{seed};
    bank_.initialize(init);
    rng extra{seed ^ 0xA11CA7E5ull};
    const auto& s = opt_.routing;
    if (s.strategy == strategy::latent_skills)
      skills_.emplace(s.tasks, N, s.skills_temperature, s.skills_init, extra);
    if (is(estimator::reinforce))
      baseline_.emplace(s.baseline, input_dim(), s.baseline_hidden, s.baseline_momentum, extra);
    if (s.strategy == strategy::adamix) groups_ = smear::parameter_groups(bank_.layout());
  }

  const Expert& expert() const noexcept { return bank_.expert(); }
  std::size_t input_dim() const noexcept { return bank_.expert().input_dim(); }
  std::size_t output_dim() const noexcept { return bank_.expert().output_dim(); }
  bool residual() const noexcept { return residual_; }
  const layer_options& options() const noexcept { return opt_; }
  const strategy_options& strategy() const noexcept { return opt_.routing; }
  /// Whether a learned router decides the routing (smear, ensemble, top-k).
  bool uses_router() const noexcept {
    const auto s = opt_.routing.strategy;
    return s == strategy::smear || s == strategy::ensemble || s == strategy::top_k;
  }

  expert_bank<Expert, N>& bank() noexcept {
    touch();
    return bank_;
  }
  const expert_bank<Expert, N>& bank() const noexcept { return bank_; }
  smear::router<T>& router() noexcept {
    touch();
    return router_;
  }
  const smear::router<T>& router() const noexcept { return router_; }
  /// The latent-skill allocation; throws state_error under another strategy.
  latent_skills<T>& skills() {
    if (!skills_) throw state_error("layer::skills: the strategy is not latent_skills");
    touch();
    return *skills_;
  }
  const latent_skills<T>& skills() const {
    if (!skills_) throw state_error("layer::skills: the strategy is not latent_skills");
    return *skills_;
  }
  /// REINFORCE's baseline; throws state_error under another estimator.
  reinforce_baseline<T>& baseline() {
    if (!baseline_) throw state_error("layer::baseline: the estimator is not reinforce");
    return *baseline_;
  }
  const reinforce_baseline<T>& baseline() const {
    if (!baseline_) throw state_error("layer::baseline: the estimator is not reinforce");
    return *baseline_;
  }

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

  /// Every trainable tensor: the expert bank ("experts", decayed), the router's tensors when
  /// the strategy has a router ("router.*"), the skills ("skills.logits") and the learned
  /// REINFORCE baseline ("baseline.parameters", trained on its own squared error).
  parameter_list<T> parameters() {
    touch();
    parameter_list<T> out;
    auto v = bank_.values(), g = bank_.gradients();
    out.push_back({"experts", {v.data, v.rows * v.cols}, {g.data, g.rows * g.cols}, true});
    if (uses_router()) router_.append_parameters(out, "router.");
    if (skills_) skills_->append_parameters(out, "skills.");
    if (baseline_) baseline_->append_parameters(out, "baseline.");
    return out;
  }

  /// Sets every gradient to zero.
  void zero_grad() noexcept {
    bank_.zero_grad();
    router_.zero_grad();
    if (skills_) skills_->zero_grad();
    if (baseline_) baseline_->zero_grad();
  }

  /// The distribution over experts of the last forward, [B, N]: the router's (after expert
  /// dropout) for smear, ensemble and top-k (DSelect-k: its selection weights, normalised),
  /// one-hot for tag and hash routing, the allocation for latent skills, the share of
  /// parameter groups per expert for AdaMix in training (uniform at inference).
  matrix_ref<const T> routing() const noexcept { return {weights_.data(), batch_, N}; }

  /// The experts each example of the last forward ran, [B, k] (k = 1 except top-k routing):
  /// the chosen ones for discrete strategies, the most probable one for soft strategies.
  matrix_ref<const std::int32_t> choices() const noexcept {
    return {choices_.data(), batch_, choice_count()};
  }

  /// The regularisers backward() differentiates along with the caller's loss, as a batch
  /// mean: DSelect-k's selection entropy and unused-code penalty, REINFORCE's −bonus·H(p).
  T auxiliary_loss() const noexcept { return aux_; }

  /// SMEAR at inference with a fixed distribution per task: row t of `p` ([tasks, N], rows
  /// summing to 1) routes every example with tag t, merged once and cached. Used in evaluation
  /// mode when forward() gets tags. Throws shape_error / value_error for a bad matrix.
  void set_task_routing(matrix_ref<const T> p) {
    if (opt_.routing.strategy != strategy::smear)
      throw state_error("layer::set_task_routing: only the smear strategy routes by a per-task "
                        "distribution");
    if (p.rows == 0 || p.cols != N)
      throw shape_error(detail::message("layer::set_task_routing: p is ", detail::shape(p.rows, p.cols),
                                        ", expected [tasks, N] with N = ", N));
    task_routing_.resize(p.rows * N);
    for (std::size_t t = 0; t < p.rows; ++t) {
      T sum = 0;
      for (std::size_t e = 0; e < N; ++e) {
        if (!(p(t, e) >= T(0)) || !std::isfinite(p(t, e)))
          throw value_error(detail::message("layer::set_task_routing: p(", t, ", ", e, ") = ", p(t, e),
                                            " is not a probability"));
        sum += task_routing_[t * N + e] = p(t, e);
      }
      if (std::abs(sum - T(1)) > T(1e-3))
        throw value_error(detail::message("layer::set_task_routing: row ", t, " sums to ", sum,
                                          ", expected 1"));
    }
    task_count_ = p.rows;
    touch();
  }
  void clear_task_routing() noexcept {
    task_count_ = 0;
    touch();
  }
  /// Ends the validity of merged experts cached for inference.
  void invalidate_cache() noexcept { touch(); }
  /// How many times the inference cache has been (re)built.
  std::size_t cache_builds() const noexcept { return cache_builds_; }

  /// Bytes of the per-call buffers the layer holds now (merged parameters, saved activations,
  /// per-thread scratch, expert outputs for mixtures, the inference cache, the router's).
  std::size_t workspace_bytes() const noexcept {
    const std::size_t values = merged_.capacity() + saved_.capacity() + dparams_.capacity() +
                               scratch_.capacity() + dprobs_.capacity() + weights_.capacity() +
                               soft_.capacity() + coef_.capacity() + dcoef_.capacity() +
                               outputs_.capacity() + dxtmp_.capacity() + dbank_.capacity() +
                               cache_.capacity() + cache_weights_.capacity() + losses_.capacity();
    return sizeof(T) * values + sizeof(const T*) * theta_.capacity() +
           sizeof(std::int32_t) * (choices_.capacity() + selected_.capacity() + tags_.capacity()) +
           sizeof(std::size_t) * count_.capacity() + touched_.capacity() + router_.workspace_bytes();
  }

  /// y ← block(x). `x` is [B, L, input_dim] with per-example lengths; `y` has B·L·output_dim
  /// values and is written in full (padding rows are zero). `in` carries what some strategies
  /// need: tags (tag, latent skills, task routing), token or example ids (hash). Throws
  /// shape_error / value_error before any work on a bad shape or input, numeric_error in
  /// checked mode.
  void forward(tokens<const T> x, std::span<T> y, route_inputs in = {}) {
    constexpr const char* op = "smear::layer::forward";
    check_input(x, op);
    if (y.size() != x.batch * x.length * output_dim())
      throw shape_error(detail::message(op, ": y has ", y.size(), " values, expected [B, L, d_out] = ",
                                        detail::shape(x.batch, x.length, output_dim())));
    path_ = choose_path(x, in, op);
    pending_backward_ = false;
    if (opt_.check_finite) detail::check_finite<T>({x.data, x.size()}, op, "x");
    reserve(x.batch, x.length);
    const Backend be{};
    aux_ = T(0);
    was_training_ = training_;
    switch (path_) {
      case path::merge: route_merge(be, x); break;
      case path::cached: route_cached(x.batch); break;
      case path::select: route_select(x, in); break;
      case path::gather: route_gather(x.batch); break;
      case path::mixture: route_mixture(be, x); break;
    }
    if (path_ == path::mixture)
      apply_mixture(be, x, y);
    else
      apply(be, x, y);
    if (opt_.check_finite) detail::check_finite<T>(std::span<const T>(y), op, "y");
    last_ = x;
    pending_backward_ = true;
  }

  /// Given dy = ∂ℓ/∂y for the last forward, overwrites dx (B·L·input_dim values) with ∂ℓ/∂x
  /// and adds the parameters' gradients into their gradient buffers. Must follow a forward,
  /// once. REINFORCE in training needs `example_losses`: each example's loss ℓ_b ([B]); its
  /// router gradient is that of the batch mean, mean_b (ℓ_b − baseline_b)·∇ log p_b(e_b).
  void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses = {}) {
    constexpr const char* op = "smear::layer::backward";
    if (!pending_backward_)
      throw state_error(detail::message(op, ": no forward to go back through (backward runs "
                                            "once per forward)"));
    const tokens<const T> x = last_;
    if (dy.size() != x.batch * x.length * output_dim())
      throw shape_error(detail::message(op, ": dy has ", dy.size(), " values, expected [B, L, d_out] = ",
                                        detail::shape(x.batch, x.length, output_dim())));
    if (dx.size() != x.size())
      throw shape_error(detail::message(op, ": dx has ", dx.size(), " values, expected [B, L, d_in] = ",
                                        detail::shape(x.batch, x.length, input_dim())));
    const bool reinforce = is(estimator::reinforce) && was_training_;
    if (reinforce && example_losses.empty())
      throw value_error(detail::message(op, ": REINFORCE needs each example's loss: call "
                                            "backward(dy, dx, losses) with B = ", x.batch, " losses"));
    if (!example_losses.empty() && example_losses.size() != x.batch)
      throw shape_error(detail::message(op, ": example_losses has ", example_losses.size(),
                                        " values, expected B = ", x.batch));
    if (opt_.check_finite) {
      detail::check_finite<T>(dy, op, "dy");
      detail::check_finite<T>(example_losses, op, "example_losses");
    }
    pending_backward_ = false;
    touch();
    const Backend be{};
    const tokens<T> dxt{dx.data(), x.batch, x.length, input_dim(), x.lengths};
    if (path_ == path::mixture) {
      backward_mixture(be, x, dy, dxt);
      route_backward_mixture(be, dxt, example_losses);
    } else {
      backward_experts(be, x, dy, dxt);
      route_backward(be, dxt);
    }
    if (opt_.check_finite) {
      detail::check_finite<T>(std::span<const T>(dx), op, "dx");
      auto g = bank_.gradients();
      detail::check_finite<T>({g.data, g.rows * g.cols}, op, "expert gradients");
      detail::check_finite<T>(std::span<const T>(router_.gradients()), op, "router gradients");
    }
  }

 private:
  /// How a forward finds each example's expert.
  enum class path {
    merge,    ///< θ̄ = W·Θ for the batch (smear, latent skills in training)
    cached,   ///< a merged expert per task, cached (evaluation: latent skills, adamix, task routing)
    select,   ///< one bank row (tag, hash)
    gather,   ///< one bank row per parameter group (adamix in training)
    mixture,  ///< several experts run, outputs mixed (ensemble, top-k)
  };


  static std::size_t router_outputs(const strategy_options& s) {
    return s.strategy == strategy::top_k && s.estimator == estimator::dselect ? ceil_log2(N) : N;
  }
  bool is(estimator e) const noexcept {
    return opt_.routing.strategy == strategy::top_k && opt_.routing.estimator == e;
  }
  std::size_t choice_count() const noexcept {
    return opt_.routing.strategy == strategy::top_k && opt_.routing.estimator == estimator::st_gumbel
               ? opt_.routing.k
               : 1;
  }
  /// Experts one example may run on the mixture path.
  std::size_t slots() const noexcept {
    if (path_ != path::mixture) return 1;
    return is(estimator::st_gumbel) ? opt_.routing.k : is(estimator::reinforce) ? 1 : N;
  }
  void touch() noexcept { ++version_; }

  void check_input(tokens<const T> x, const char* op) const {
    const auto shape = detail::shape(x.batch, x.length, x.dim);
    if (x.batch == 0 || x.length == 0)
      throw value_error(detail::message(op, ": empty batch, x is [B, L, d] = ", shape));
    if (x.data == nullptr) throw value_error(detail::message(op, ": x has no data"));
    if (x.dim != input_dim())
      throw shape_error(detail::message(op, ": x is [B, L, d] = ", shape, ", the experts expect d = ",
                                        input_dim()));
    if (!x.lengths.empty()) {
      if (x.lengths.size() != x.batch)
        throw shape_error(detail::message(op, ": lengths has ", x.lengths.size(),
                                          " entries, expected B = ", x.batch, " (x is ", shape, ")"));
      for (std::size_t b = 0; b < x.batch; ++b)
        if (x.lengths[b] < 1 || static_cast<std::size_t>(x.lengths[b]) > x.length)
          throw value_error(detail::message(op, ": example ", b, " has length ", x.lengths[b],
                                            ", expected 1..L = 1..", x.length,
                                            " (an all-padding example cannot be routed)"));
    }
  }

  /// Checks `in` for the strategy and picks the path; copies the tags.
  path choose_path(tokens<const T> x, const route_inputs& in, const char* op) {
    const auto s = opt_.routing.strategy;
    const bool task_routed = s == strategy::smear && !training_ && task_count_ > 0 && !in.tags.empty();
    const bool needs_tags = s == strategy::tag || s == strategy::latent_skills || task_routed;
    if (needs_tags) {
      if (in.tags.size() != x.batch)
        throw shape_error(detail::message(op, ": ", to_string(s), " routing needs one tag per example, got ",
                                          in.tags.size(), " tags for B = ", x.batch));
      const std::size_t limit = s == strategy::tag ? N : s == strategy::latent_skills ? skills_->tasks()
                                                                                       : task_count_;
      for (std::size_t b = 0; b < x.batch; ++b)
        if (in.tags[b] < 0 || static_cast<std::size_t>(in.tags[b]) >= limit)
          throw value_error(detail::message(op, ": example ", b, " has tag ", in.tags[b], ", expected 0..",
                                            limit - 1, s == strategy::tag ? " (one expert per tag)" : " (one row per task)"));
      tags_.assign(in.tags.begin(), in.tags.end());
    }
    if (s == strategy::hash) {
      if (!in.token_ids.empty() && in.token_ids.size() != x.batch * x.length)
        throw shape_error(detail::message(op, ": token_ids has ", in.token_ids.size(),
                                          " values, expected [B, L] = ", detail::shape(x.batch, x.length)));
      if (in.token_ids.empty() && !in.example_ids.empty() && in.example_ids.size() != x.batch)
        throw shape_error(detail::message(op, ": example_ids has ", in.example_ids.size(),
                                          " values, expected B = ", x.batch));
    }
    // one expert: every strategy runs it as it is (the routing is the constant 1)
    if constexpr (N == 1) return path::select;
    switch (s) {
      case strategy::smear: return task_routed ? path::cached : path::merge;
      case strategy::latent_skills: return training_ ? path::merge : path::cached;
      case strategy::adamix: return training_ ? path::gather : path::cached;
      case strategy::tag:
      case strategy::hash: return path::select;
      case strategy::ensemble:
      case strategy::top_k: return path::mixture;
    }
    return path::merge;
  }

  void reserve(std::size_t B, std::size_t L) {
    const Backend be{};
    const std::size_t threads = backend::max_threads(be);
    const std::size_t P = bank_.parameter_count(), k = slots();
    saved_stride_ = bank_.expert().saved_size(L);
    // a run of the inference cache may hold the whole batch (group_runs)
    const bool runs = is_row_wise_expert<Expert> && path_ == path::cached;
    scratch_stride_ = bank_.expert().scratch_size(runs ? B * L : L);
    grow(merged_, B * P);
    grow(saved_, B * k * saved_stride_);
    if (path_ != path::merge || !is_in_place_expert<Expert>) grow(dparams_, threads * P);  // else G_b goes in place
    grow(scratch_, threads * scratch_stride_);
    grow(dprobs_, B * std::max(N, router_.outputs()));
    grow(weights_, B * N);
    grow(soft_, B * std::max(N, std::size_t{1} << ceil_log2(N)));
    if (theta_.size() < B) theta_.resize(B);
    if (choices_.size() < B * choice_count()) choices_.resize(B * choice_count());
    if (path_ == path::mixture) {
      grow(coef_, B * k);
      grow(dcoef_, B * k);
      grow(outputs_, B * k * L * output_dim());
      grow(dxtmp_, threads * L * input_dim());
      grow(dbank_, threads * N * P);
      grow(touched_, threads * N);
      if (selected_.size() < B * k) selected_.resize(B * k);
      if (count_.size() < B) count_.resize(B);
      grow(losses_, B);
    }
    if (path_ == path::gather && selected_.size() < B * groups_.size()) selected_.resize(B * groups_.size());
    if (path_ == path::select && selected_.size() < B) selected_.resize(B);
    batch_ = B;
  }
  template <class V>
  static void grow(std::vector<V>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
  matrix_ref<T> merged() noexcept { return {merged_.data(), batch_, bank_.parameter_count()}; }
  matrix_ref<T> weights() noexcept { return {weights_.data(), batch_, N}; }
  std::span<T> saved(std::size_t slot, std::size_t rows) noexcept {
    return {saved_.data() + slot * saved_stride_, bank_.expert().saved_size(rows)};
  }
  std::span<T> scratch(std::size_t thread, std::size_t rows) noexcept {
    return {scratch_.data() + thread * scratch_stride_, bank_.expert().scratch_size(rows)};
  }
  std::span<const T> bank_row(std::size_t e) const noexcept { return bank_.values().row(e); }

  /// Writes choices_[b] = the most probable expert of weights_ row b.
  void choose_argmax(std::size_t B) {
    for (std::size_t b = 0; b < B; ++b) {
      const T* w = weights_.data() + b * N;
      choices_[b] = static_cast<std::int32_t>(std::max_element(w, w + N) - w);
    }
  }

  /// Below this many multiply-adds (valid rows × P × experts run) a batch stays on one thread:
  /// waking the others would cost more than it saves.
  static constexpr std::size_t parallel_work = std::size_t{1} << 18;

  /// Consecutive examples that one call of the expert takes as one block of rows: in the
  /// inference cache, with a row-wise expert, examples sharing a merged expert whose rows are
  /// contiguous (each but the last is full length). Elsewhere each example is its own run.
  /// runs_ holds the first example of each run, then B.
  void group_runs(tokens<const T> x) {
    runs_.clear();
    for (std::size_t b = 0; b < x.batch; ++b)
      if (!(is_row_wise_expert<Expert> && path_ == path::cached && b > 0 && theta_[b] == theta_[runs_.back()] &&
            x.valid(b - 1) == x.length))
        runs_.push_back(b);
    runs_.push_back(x.batch);
  }
  static std::size_t run_rows(tokens<const T> x, std::size_t first, std::size_t last) {
    return (last - first - 1) * x.length + x.valid(last - 1);
  }

  /// f(first, last, thread) for each run, spread over threads when there is enough work.
  template <class F>
  void for_each_run(const Backend& be, tokens<const T> x, F&& f) {
    const std::size_t runs = runs_.size() - 1;
    std::size_t rows = 0;
    for (std::size_t b = 0; b < x.batch; ++b) rows += x.valid(b);
    const auto run = [&](std::size_t r, std::size_t thread) { f(runs_[r], runs_[r + 1], thread); };
    if (runs == 1 || rows * bank_.parameter_count() < parallel_work) {
      for (std::size_t r = 0; r < runs; ++r) run(r, std::size_t{0});
      return;
    }
    backend::parallel_for(be, runs, run);
  }

  /// f(b, thread) for every example of a mixture, spread over the backend's threads when the
  /// batch is worth it.
  template <class F>
  void for_each_example(const Backend& be, tokens<const T> x, F&& f) {
    std::size_t rows = 0;
    for (std::size_t b = 0; b < x.batch; ++b) rows += x.valid(b) * count_[b];
    if (rows * bank_.parameter_count() < parallel_work) {
      for (std::size_t b = 0; b < x.batch; ++b) f(b, std::size_t{0});
      return;
    }
    backend::parallel_for(be, x.batch, std::forward<F>(f));
  }

  // ---- routing, forward ----------------------------------------------------------------

  void route_merge(const Backend& be, tokens<const T> x) {
    const std::size_t B = x.batch;
    if (opt_.routing.strategy == strategy::smear) {
      router_.forward(be, x, training_, gen_);
      const auto p = router_.probabilities();
      for (std::size_t b = 0; b < B; ++b) std::copy_n(p.row(b).data(), N, weights_.data() + b * N);
    } else {  // latent skills, training
      for (std::size_t b = 0; b < B; ++b)
        skills_->weights(static_cast<std::size_t>(tags_[b]), true, gen_,
                         {soft_.data() + b * N, N}, {weights_.data() + b * N, N});
    }
    // θ̄ = W·Θ for the whole batch
    backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>(weights()),
                     matrix_ref<const T>(bank_.values()), T(0), merged());
    for (std::size_t b = 0; b < B; ++b) theta_[b] = merged_.data() + b * bank_.parameter_count();
    choose_argmax(B);
  }

  /// Evaluation with a routing that depends on the task only: merge once per task.
  void route_cached(std::size_t B) {
    const auto s = opt_.routing.strategy;
    const std::size_t rows = s == strategy::adamix ? 1 : s == strategy::latent_skills ? skills_->tasks()
                                                                                    : task_count_;
    const std::size_t P = bank_.parameter_count();
    if (cache_version_ != version_ || cache_rows_ != rows || cache_strategy_ != s) {
      cache_weights_.resize(rows * N);
      std::vector<T> s_unused;
      for (std::size_t t = 0; t < rows; ++t) {
        std::span<T> w{cache_weights_.data() + t * N, N};
        if (s == strategy::adamix) {
          std::fill(w.begin(), w.end(), T(1) / static_cast<T>(N));
        } else if (s == strategy::latent_skills) {
          s_unused.resize(N);
          skills_->weights(t, false, gen_, s_unused, w);
        } else {
          std::copy_n(task_routing_.data() + t * N, N, w.begin());
        }
      }
      cache_.resize(rows * P);
      backend::gemm<T>(Backend{}, false, false, T(1), matrix_ref<const T>{cache_weights_.data(), rows, N},
                       matrix_ref<const T>(bank_.values()), T(0), matrix_ref<T>{cache_.data(), rows, P});
      cache_version_ = version_;
      cache_rows_ = rows;
      cache_strategy_ = s;
      ++cache_builds_;
    }
    for (std::size_t b = 0; b < B; ++b) {
      const std::size_t r = s == strategy::adamix ? 0 : static_cast<std::size_t>(tags_[b]);
      theta_[b] = cache_.data() + r * P;
      std::copy_n(cache_weights_.data() + r * N, N, weights_.data() + b * N);
      if (s == strategy::latent_skills)  // σ(a) of the task, for a backward in evaluation mode
        for (std::size_t e = 0; e < N; ++e)
          soft_[b * N + e] = T(1) / (T(1) + std::exp(-skills_->logits()(r, e)));
    }
    choose_argmax(B);
  }

  void route_select(tokens<const T> x, const route_inputs& in) {
    const std::size_t B = x.batch;
    for (std::size_t b = 0; b < B; ++b) {
      std::size_t e = 0;  // the only expert when N = 1
      if (N > 1 && opt_.routing.strategy == strategy::tag) {
        e = static_cast<std::size_t>(tags_[b]);
      } else if (N > 1) {
        const std::uint64_t seed = opt_.routing.hash_seed;
        const std::uint64_t h =
            !in.token_ids.empty()
                ? detail::hash_tokens(in.token_ids.subspan(b * x.length, x.valid(b)), seed)
                : detail::hash_id(in.example_ids.empty() ? b : in.example_ids[b], seed);
        e = static_cast<std::size_t>(h % N);
      }
      selected_[b] = static_cast<std::int32_t>(e);
      choices_[b] = static_cast<std::int32_t>(e);
      theta_[b] = bank_row(e).data();
      std::fill_n(weights_.data() + b * N, N, T(0));
      weights_[b * N + e] = T(1);
    }
  }

  /// AdaMix in training: each parameter group of each example from an independent random expert.
  void route_gather(std::size_t B) {
    const std::size_t G = groups_.size();
    const T share = T(1) / static_cast<T>(G);
    for (std::size_t b = 0; b < B; ++b) {
      std::span<T> row = merged().row(b);
      std::fill_n(weights_.data() + b * N, N, T(0));
      for (std::size_t g = 0; g < G; ++g) {
        const auto e = static_cast<std::size_t>(gen_.below(N));
        selected_[b * G + g] = static_cast<std::int32_t>(e);
        std::copy_n(bank_row(e).data() + groups_[g].offset, groups_[g].size, row.data() + groups_[g].offset);
        weights_[b * N + e] += share;
      }
      choices_[b] = selected_[b * G];
      theta_[b] = row.data();
    }
  }

  /// Ensemble and top-k: which experts each example runs (selected_, count_) and with what
  /// coefficient (coef_); soft_ keeps what the estimator's backward needs.
  void route_mixture(const Backend& be, tokens<const T> x) {
    const std::size_t B = x.batch, k = slots();
    const auto& s = opt_.routing;
    const bool dropout = s.strategy == strategy::ensemble;  // expert dropout: soft mixtures only
    router_.forward(be, x, training_ && dropout, gen_);
    const auto p = router_.probabilities();
    const auto z = router_.logits();
    const T inv_t = static_cast<T>(1.0 / router_.options().temperature);
    for (std::size_t b = 0; b < B; ++b) {
      std::int32_t* sel = selected_.data() + b * k;
      T* c = coef_.data() + b * k;
      T* w = weights_.data() + b * N;
      std::size_t n = 0;
      if (s.strategy == strategy::ensemble) {
        for (std::size_t e = 0; e < N; ++e) {
          w[e] = p(b, e);
          if (w[e] > T(0)) sel[n] = static_cast<std::int32_t>(e), c[n++] = w[e];
        }
        choices_[b] = static_cast<std::int32_t>(std::max_element(w, w + N) - w);
      } else if (s.estimator == estimator::st_gumbel) {
        // s = softmax((z + g) / τ) in training, p at evaluation; run the top k of s
        std::span<T> soft{soft_.data() + b * N, N};
        for (std::size_t e = 0; e < N; ++e) w[e] = p(b, e);
        estimate::gumbel_softmax<T>(z.row(b), inv_t, training_, gen_, soft);
        estimate::top_k<T>(soft, {sel, k});
        for (std::size_t j = 0; j < k; ++j) {
          c[j] = T(1) / static_cast<T>(k);
          choices_[b * k + j] = sel[j];
        }
        n = k;
      } else if (s.estimator == estimator::reinforce) {
        for (std::size_t i = 0; i < N; ++i) w[i] = p(b, i);
        const std::size_t e = estimate::sample_or_argmax<T>(p.row(b), training_, gen_);
        sel[0] = choices_[b] = static_cast<std::int32_t>(e);
        c[0] = T(1);
        n = 1;
        if (s.entropy_bonus > 0.0)
          aux_ -= static_cast<T>(s.entropy_bonus) * estimate::entropy<T>(p.row(b)) / static_cast<T>(B);
      } else {  // DSelect-k: gates g_i = smooth_step(z_i), code weights r
        const std::size_t K = router_.outputs(), codes = std::size_t{1} << K;
        std::span<T> r{soft_.data() + b * codes, codes};
        // the gates are kept in dprobs_ for backward; dprobs_ is free until then
        const auto picked = dselect::select<T>(z.row(b), s.dselect_gamma, {dprobs_.data() + b * K, K}, r, {w, N});
        const auto best = static_cast<std::size_t>(std::max_element(w, w + N) - w);
        choices_[b] = static_cast<std::int32_t>(best);
        if (training_) {
          for (std::size_t e = 0; e < N; ++e)
            if (r[e] > T(0)) sel[n] = static_cast<std::int32_t>(e), c[n++] = r[e];
        } else {
          sel[0] = static_cast<std::int32_t>(best), c[0] = T(1), n = 1;
        }
        aux_ += (static_cast<T>(s.dselect_entropy) * picked.entropy +
                 static_cast<T>(s.dselect_unused_penalty) * picked.unused) /
                static_cast<T>(B);
      }
      count_[b] = n;
    }
  }

  // ---- experts, forward ----------------------------------------------------------------

  void apply(const Backend& be, tokens<const T> x, std::span<T> y) {
    const Expert& ex = bank_.expert();
    const std::size_t din = input_dim(), dout = output_dim(), P = bank_.parameter_count(), L = x.length;
    group_runs(x);
    for_each_run(be, x, [&](std::size_t first, std::size_t last, std::size_t) {
      const std::size_t rows = run_rows(x, first, last);
      matrix_ref<const T> xb{x.data + first * L * din, rows, din};
      matrix_ref<T> yb{y.data() + first * L * dout, rows, dout};
      ex.forward(be, std::span<const T>(theta_[first], P), xb, yb, saved(first, rows));
      if (residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(xb.data, rows * din), {yb.data, rows * dout});
      std::fill(yb.data + rows * dout, y.data() + last * L * dout, T(0));
    });
  }

  void apply_mixture(const Backend& be, tokens<const T> x, std::span<T> y) {
    const Expert& ex = bank_.expert();
    const std::size_t din = input_dim(), dout = output_dim(), k = slots(), L = x.length;
    for_each_example(be, x, [&](std::size_t b, std::size_t) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      std::span<T> yb{y.data() + b * L * dout, rows * dout};
      if (residual_)
        std::copy_n(xb.data, rows * din, yb.data());
      else
        std::fill(yb.begin(), yb.end(), T(0));
      for (std::size_t j = 0; j < count_[b]; ++j) {
        const std::size_t slot = b * k + j;
        matrix_ref<T> out{outputs_.data() + slot * L * dout, rows, dout};
        ex.forward(be, bank_row(static_cast<std::size_t>(selected_[slot])), xb, out, saved(slot, rows));
        backend::axpy<T>(be, coef_[slot], std::span<const T>(out.data, rows * dout), yb);
      }
      std::fill(y.data() + b * L * dout + rows * dout, y.data() + (b + 1) * L * dout, T(0));
    });
  }

  // ---- backward ------------------------------------------------------------------------

  /// Expert backward for the single-parameter-vector paths: ∂ℓ/∂x into dx and G_b = ∂ℓ/∂θ_b
  /// into row b of merged().
  void backward_experts(const Backend& be, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    const Expert& ex = bank_.expert();
    const std::size_t P = bank_.parameter_count(), din = input_dim(), dout = output_dim(), L = x.length;
    for_each_run(be, x, [&](std::size_t first, std::size_t last, std::size_t thread) {
      const std::size_t rows = run_rows(x, first, last);
      matrix_ref<const T> xb{x.data + first * L * din, rows, din};
      matrix_ref<const T> dyb{dy.data() + first * L * dout, rows, dout};
      matrix_ref<T> dxb{dx.data + first * L * din, rows, din};
      // θ̄ is no longer needed after this: the run's first row of merged() gets its gradient,
      // written there directly when θ̄ is that row and the expert can write over its
      // parameters; a run's other rows get 0 (they share θ̄ and its routing weights)
      const std::span<T> row = merged().row(first);
      const bool in_place = is_in_place_expert<Expert> && theta_[first] == row.data();
      std::span<T> g = in_place ? row : std::span<T>{dparams_.data() + thread * P, P};
      ex.backward(be, std::span<const T>(theta_[first], P), xb, std::span<const T>(saved(first, rows)), dyb,
                  dxb, g, scratch(thread, rows));
      if (residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(dyb.data, rows * dout), {dxb.data, rows * din});
      std::fill(dxb.data + rows * din, dx.data + last * L * din, T(0));
      if (!in_place) std::copy(g.begin(), g.end(), row.begin());
      for (std::size_t b = first + 1; b < last; ++b) std::ranges::fill(merged().row(b), T(0));
    });
  }

  /// From G (rows of merged()) to the bank's and the routing's gradients.
  void route_backward(const Backend& be, tokens<T> dx) {
    const std::size_t B = batch_;
    const matrix_ref<const T> grad_merged = merged();
    auto bank_grad = bank_.gradients();
    if (path_ == path::select) {
      for (std::size_t b = 0; b < B; ++b)
        backend::axpy<T>(be, T(1), grad_merged.row(b), bank_grad.row(static_cast<std::size_t>(selected_[b])));
      return;
    }
    if (path_ == path::gather) {
      const std::size_t G = groups_.size();
      for (std::size_t b = 0; b < B; ++b)
        for (std::size_t g = 0; g < G; ++g)
          backend::axpy<T>(be, T(1), grad_merged.row(b).subspan(groups_[g].offset, groups_[g].size),
                           bank_grad.row(static_cast<std::size_t>(selected_[b * G + g]))
                               .subspan(groups_[g].offset, groups_[g].size));
      return;
    }
    // merged: ∂ℓ/∂Θ += Wᵀ·G ; ∂ℓ/∂W = G·Θᵀ
    backend::gemm<T>(be, true, false, T(1), matrix_ref<const T>(weights()), grad_merged, T(1), bank_grad);
    const auto s = opt_.routing.strategy;
    const bool routed = (s == strategy::smear && path_ == path::merge) || s == strategy::latent_skills;
    if (!routed) return;
    matrix_ref<T> dw{dprobs_.data(), B, N};
    backend::gemm<T>(be, false, true, T(1), grad_merged, matrix_ref<const T>(bank_.values()), T(0), dw);
    if (s == strategy::smear) {
      router_.backward(be, matrix_ref<const T>(dw), dx);
      return;
    }
    for (std::size_t b = 0; b < B; ++b)
      skills_->backward(static_cast<std::size_t>(tags_[b]), was_training_, {soft_.data() + b * N, N},
                        {weights_.data() + b * N, N}, dw.row(b));
  }

  /// Mixture backward: each run expert's backward, scaled by its coefficient; dcoef_ gets
  /// ⟨dy_b, f(x_b; θ_e)⟩, the gradient of each coefficient.
  void backward_mixture(const Backend& be, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    const Expert& ex = bank_.expert();
    const std::size_t P = bank_.parameter_count(), din = input_dim(), dout = output_dim(), k = slots(),
                      L = x.length, threads = backend::max_threads(be);
    // each thread's accumulator row for expert e is written by the first example that ran e on it
    std::fill_n(touched_.data(), threads * N, char{0});
    for_each_example(be, x, [&](std::size_t b, std::size_t thread) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      matrix_ref<const T> dyb{dy.data() + b * L * dout, rows, dout};
      std::span<T> dxb{dx.data + b * L * din, L * din};
      if (residual_) {
        std::copy_n(dyb.data, rows * dout, dxb.data());
        std::fill(dxb.begin() + static_cast<std::ptrdiff_t>(rows * din), dxb.end(), T(0));
      } else {
        std::fill(dxb.begin(), dxb.end(), T(0));
      }
      std::span<T> g{dparams_.data() + thread * P, P};
      matrix_ref<T> dxe{dxtmp_.data() + thread * L * din, rows, din};
      for (std::size_t j = 0; j < count_[b]; ++j) {
        const std::size_t slot = b * k + j, e = static_cast<std::size_t>(selected_[slot]);
        ex.backward(be, bank_row(e), xb, std::span<const T>(saved(slot, rows)), dyb, dxe, g,
                    scratch(thread, rows));
        backend::axpy<T>(be, coef_[slot], std::span<const T>(dxe.data, rows * din), dxb.first(rows * din));
        std::span<T> acc{dbank_.data() + (thread * N + e) * P, P};
        if (touched_[thread * N + e]) {
          backend::axpy<T>(be, coef_[slot], std::span<const T>(g), acc);
        } else {
          touched_[thread * N + e] = 1;
          std::transform(g.begin(), g.end(), acc.begin(), [c = coef_[slot]](T v) { return c * v; });
        }
        const T* out = outputs_.data() + slot * L * dout;
        T dot = 0;
        for (std::size_t i = 0; i < rows * dout; ++i) dot += dyb.data[i] * out[i];
        dcoef_[slot] = dot;
      }
    });
    auto bank_grad = bank_.gradients();
    for (std::size_t t = 0; t < threads; ++t)
      for (std::size_t e = 0; e < N; ++e)
        if (touched_[t * N + e])
          backend::axpy<T>(be, T(1), std::span<const T>(dbank_.data() + (t * N + e) * P, P), bank_grad.row(e));
  }

  /// The router's gradient for the ensemble and each top-k estimator.
  void route_backward_mixture(const Backend& be, tokens<T> dx, std::span<const T> losses) {
    const std::size_t B = batch_, k = slots();
    const auto& s = opt_.routing;
    const T inv_t = static_cast<T>(1.0 / router_.options().temperature);
    const T inv_b = T(1) / static_cast<T>(B);
    if (s.strategy == strategy::ensemble) {  // y = Σ p_e f_e: ∂ℓ/∂p_e = ⟨dy, f_e⟩
      matrix_ref<T> dp{dprobs_.data(), B, N};
      for (std::size_t b = 0; b < B; ++b) {
        std::fill_n(dp.row(b).data(), N, T(0));
        for (std::size_t j = 0; j < count_[b]; ++j) dp(b, static_cast<std::size_t>(selected_[b * k + j])) = dcoef_[b * k + j];
      }
      router_.backward(be, matrix_ref<const T>(dp), dx);
      return;
    }
    matrix_ref<T> dz = router_.logit_gradients();
    const auto p = router_.probabilities();
    if (s.estimator == estimator::st_gumbel) {
      // y = Σ_j (1 − sg(s_j) + s_j)/k · f_j: ∂ℓ/∂s_j = ⟨dy, f_j⟩ / k, then through the softmax
      for (std::size_t b = 0; b < B; ++b) {
        std::span<T> d = dz.row(b);
        std::fill(d.begin(), d.end(), T(0));
        for (std::size_t j = 0; j < k; ++j) d[static_cast<std::size_t>(selected_[b * k + j])] = dcoef_[b * k + j] / static_cast<T>(k);
        estimate::softmax_backward<T>({soft_.data() + b * N, N}, d, inv_t);
      }
    } else if (s.estimator == estimator::reinforce) {
      if (!was_training_) return;  // argmax routing: nothing to estimate
      // ∂/∂z of mean_b (ℓ_b − baseline_b)·log p_b(e_b) − bonus·H(p_b)
      std::span<T> base{losses_.data(), B};
      baseline_->predict(router_.features(), losses, base);
      for (std::size_t b = 0; b < B; ++b)
        estimate::reinforce_gradient<T>(p.row(b), static_cast<std::size_t>(selected_[b]), (losses[b] - base[b]) * inv_b,
                                        static_cast<T>(s.entropy_bonus) * inv_b, inv_t, dz.row(b));
      baseline_->update(router_.features(), losses, base);
    } else {  // DSelect-k
      if (!was_training_) return;  // one expert with coefficient 1: no gradient to the gates
      const std::size_t K = router_.outputs(), codes = std::size_t{1} << K;
      const auto z = router_.logits();
      dr_.resize(codes);
      for (std::size_t b = 0; b < B; ++b) {
        std::fill(dr_.begin(), dr_.end(), T(0));
        for (std::size_t j = 0; j < count_[b]; ++j) dr_[static_cast<std::size_t>(selected_[b * k + j])] = dcoef_[b * k + j];
        dselect::select_backward<T>(z.row(b), s.dselect_gamma, {dprobs_.data() + b * K, K},
                                    {soft_.data() + b * codes, codes}, N, static_cast<T>(s.dselect_entropy) * inv_b,
                                    static_cast<T>(s.dselect_unused_penalty) * inv_b, dr_, dz.row(b).first(K));
      }
    }
    router_.backward_logits(be, matrix_ref<const T>(dz), dx);
  }

  expert_bank<Expert, N> bank_;
  smear::router<T> router_;
  layer_options opt_;
  bool residual_;
  bool training_ = true, was_training_ = true;
  rng gen_;
  std::optional<latent_skills<T>> skills_;
  std::optional<reinforce_baseline<T>> baseline_;
  std::vector<parameter_range> groups_;
  path path_ = path::merge;
  // per-call buffers
  std::vector<std::size_t> runs_;  // see group_runs
  std::vector<T> merged_, saved_, dparams_, scratch_, dprobs_, weights_, soft_, coef_, dcoef_,
      outputs_, dxtmp_, dbank_, losses_, dr_;
  std::vector<const T*> theta_;
  std::vector<std::int32_t> choices_, selected_, tags_;
  std::vector<std::size_t> count_;
  std::vector<char> touched_;  ///< [threads, N]: which rows of dbank_ this backward wrote
  std::size_t batch_ = 0, saved_stride_ = 0, scratch_stride_ = 0;
  T aux_ = 0;
  tokens<const T> last_{};
  bool pending_backward_ = false;
  // task routing and the inference cache
  std::vector<T> task_routing_, cache_, cache_weights_;
  std::size_t task_count_ = 0, cache_rows_ = 0, cache_builds_ = 0;
  std::uint64_t version_ = 1, cache_version_ = 0;
  smear::strategy cache_strategy_ = smear::strategy::smear;
};

}  // namespace smear
