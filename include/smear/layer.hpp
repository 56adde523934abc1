#pragma once
/// \file layer.hpp
/// A routing block of N experts on the host (reference and cpu backends), under any of the
/// strategies the SMEAR paper compares. The strategy's planner (smear/routing/) decides the
/// routing as a plan; this layer executes plans: it runs the router, merges, gathers or mixes
/// the experts, applies them, and goes back through all of it.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "smear/backend_concepts.hpp"
#include "smear/layer_core.hpp"
#include "smear/parameter.hpp"
#include "smear/tensor.hpp"

namespace smear {

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
/// separately and mix their outputs, and Soft MoE (row-wise experts only) runs each expert on s
/// slots mixed from every example's valid tokens by a softmax over the tokens and gives each
/// token a softmax mix of the slots' outputs (smear/routing/soft_moe.hpp). A single expert and
/// a parameter-matched dense adapter are `layer<E, 1>` (with `adapter{d, N·m}` for the dense
/// one), which runs its one expert directly: no router, no merge.
///
/// Causal segment routing (router_options::segment_length = ℓ): the routing unit is a segment
/// of ℓ tokens, routed by the previous segment's pooled tokens (the prior for the first); the
/// planner and the executor see the batch [B, L] as B·L/ℓ units of ℓ tokens (the same memory),
/// and decoder generates one token at a time, merging once per segment.
///
/// Inference cache: plans that merge through a per-task table (latent skills and AdaMix in
/// evaluation, SMEAR after set_task_routing()) merge each row once and reuse the merged experts
/// until the table or a parameter may have changed: backward(), train(), a forward in training
/// mode, parameters(), the non-const bank()/router()/skills()/baseline()/cluster_centres()
/// accessors and invalidate_cache() all end their validity.
/// Call invalidate_cache() after writing parameters through spans obtained earlier.
///
/// Threads: a layer is used by one thread at a time, except the const forward(workspace&, ...)
/// of a layer in evaluation mode, which any number of threads may call at once on one shared
/// layer, each with its own workspace (see layer::workspace; README "Thread safety").
///
/// Inputs are read in place: `x` must stay alive and unchanged from forward() to backward().
/// Buffers are sized at the first call with a given (B, L) and plan kind and reused: after
/// that, calls at the same or a smaller shape do not allocate.
///
/// Example:
/// ```
/// smear::layer<smear::adapter<float>, 8> block{smear::adapter<float>{768, 24}, {}, 42};
/// block.forward(smear::make_tokens(x.data(), B, L, 768, lengths), y);
/// block.backward(dy, dx);   // accumulates into the parameters' gradients
/// ```
template <class Expert, std::size_t N, class Backend>
class layer : public layer_core<Expert, N> {
  using core = layer_core<Expert, N>;
  static_assert(detail::diagnose_host_kernel_set<Backend, typename Expert::value_type>());

 public:
  using typename core::T;
  using typename core::value_type;
  using backend_type = Backend;

 private:
  /// Merged experts of a per-task table, valid while the layer's parameters are at `version`.
  struct cache_entry {
    std::uint64_t version = 0;
    std::vector<T> table;   ///< [rows, N]: the table they were merged from
    std::vector<T> values;  ///< [rows, P]
  };
  /// The inference cache, shared by every forward of the layer (each thread's included): the
  /// first to need an entry builds it under the lock, the others wait and then read it; an
  /// entry in use stays alive (shared_ptr) while a rebuild replaces it.
  class shared_cache {
   public:
    shared_cache() = default;
    shared_cache(const shared_cache& o) : entry_(o.current()) {}
    shared_cache& operator=(const shared_cache& o) {
      if (this != &o) {
        auto e = o.current();
        std::lock_guard lock(mutex_);
        entry_ = std::move(e);
      }
      return *this;
    }
    std::shared_ptr<const cache_entry> current() const {
      std::lock_guard lock(mutex_);
      return entry_;
    }
    /// The entry for (version, table), built by `build` unless the current one is it.
    template <class Build>
    std::shared_ptr<const cache_entry> get(std::uint64_t at, std::span<const T> table, Build&& build) {
      std::lock_guard lock(mutex_);
      if (!entry_ || entry_->version != at || !std::ranges::equal(entry_->table, table)) {
        auto e = std::make_shared<cache_entry>();
        e->version = at;
        e->table.assign(table.begin(), table.end());
        build(*e);
        entry_ = std::move(e);
      }
      return entry_;
    }
    std::size_t bytes() const {
      auto e = current();
      return e ? sizeof(T) * (e->table.capacity() + e->values.capacity()) : 0;
    }

   private:
    mutable std::mutex mutex_;
    std::shared_ptr<const cache_entry> entry_;
  };

  /// The executor's per-call buffers.
  struct buffers {
    std::vector<std::size_t> runs;  ///< see group_runs
    std::vector<T> merged;          ///< [B, P]: θ̄_b, the merged (or gathered) parameters of example b
    std::vector<T> merged_grad;     ///< [B, P]: G_b = ∂ℓ/∂θ̄_b (merge and gather plans)
    std::vector<T> dweights;        ///< [B, N]: ∂ℓ/∂W measured for the router (G·Θᵀ, or a mixture's ⟨dy, f⟩)
    std::vector<T> dparams;         ///< mixture [threads, P]: ∂ℓ/∂θ_e of the expert a thread ran last
    std::vector<T> saved, scratch, coef, dcoef, outputs, dxtmp, dbank;
    std::vector<const T*> theta;    ///< [B]: the parameters example b runs (merged, the cache or a bank row)
    std::vector<std::int32_t> sel;  ///< mixture [B, k]: the expert of each slot
    std::vector<std::size_t> count;
    std::vector<char> touched;  ///< [threads, N]: which rows of dbank this backward wrote
    typename smear::soft_moe<T>::workspace soft;  ///< a soft plan's dispatch, slots and combine
    std::size_t saved_stride = 0, scratch_stride = 0;
    std::size_t threads = 1;                    ///< the thread count the per-thread buffers are for
    bool dw_ready = false;                      ///< dweights holds this backward's ∂ℓ/∂W
    std::shared_ptr<const cache_entry> cache;  ///< the cache entry theta points into
    typename core::unit_buffers units;          ///< the batch by routing units (segment routing)

    std::size_t bytes() const noexcept {
      std::size_t values = 0;
      for (const auto* v : {&merged, &merged_grad, &dweights, &dparams, &saved, &scratch, &coef, &dcoef, &outputs,
                            &dxtmp, &dbank})
        values += v->capacity();
      return sizeof(T) * values + sizeof(const T*) * theta.capacity() + sizeof(std::int32_t) * sel.capacity() +
             sizeof(std::size_t) * (count.capacity() + runs.capacity()) + touched.capacity() + units.bytes() +
             soft.bytes();
    }
  };

  /// What one forward executes and writes: its plan, the router's workspace, the buffers.
  struct frame {
    routing_plan<T>& plan;
    typename smear::router<T>::workspace& route;
    buffers& buf;
  };

 public:
  /// Everything one forward writes, for the const forward of a shared evaluation layer: one
  /// per thread. It holds the plan, the router's and the executor's buffers, a copy of the
  /// strategy's planner (refreshed when the layer's parameters change) and the generator that
  /// random routing draws from (no other strategy draws in evaluation). Buffers grow to the
  /// largest batch seen and are reused, so a thread's steady-state calls do not allocate.
  class workspace {
   public:
    explicit workspace(std::uint64_t seed = 0) : gen_(seed) {}

    /// The distribution over experts of this workspace's last forward, [B, N] (see
    /// layer::routing()).
    matrix_ref<const T> routing() const noexcept { return probabilities(plan_, route_); }
    /// The experts each example of its last forward ran, [B, k] (see layer::choices()).
    matrix_ref<const std::int32_t> choices() const noexcept { return choices_of(plan_); }
    /// Bytes of its buffers.
    std::size_t bytes() const noexcept {
      return buf_.bytes() + route_.bytes() + plan_bytes(plan_) + (planner_ ? planner_->workspace_bytes() : 0);
    }

   private:
    friend class layer;
    routing_plan<T> plan_;
    typename smear::router<T>::workspace route_;
    buffers buf_;
    std::unique_ptr<planner<T>> planner_;
    std::uint64_t planner_version_ = 0;  ///< the parameter version planner_ was copied at
    rng gen_;
  };

  /// Decodes B sequences one token at a time under causal segment routing
  /// (router_options::segment_length = ℓ), as a language model generates: at the first token
  /// of each segment it routes by the previous segment's tokens (by the prior for segment 0)
  /// and merges once; the segment's other tokens reuse that merged expert. Step t gives what
  /// forward() of the whole sequences (every token valid) gives at position t. It reads the
  /// layer as the shared forward does (evaluation mode, const: decoders on one layer may run
  /// on different threads) and merges anew when the layer's parameters change. It refers to
  /// the layer: keep the layer alive and in place while decoding. Needs an expert that acts
  /// on each token alone (adapter, LoRA, linear).
  class decoder {
   public:
    /// Throws value_error without segment routing or for B = 0.
    decoder(const layer& l, std::size_t batch, std::uint64_t seed = 0)
        : layer_(&l), ws_(seed), batch_(batch), length_(l.router_.options().segment_length) {
      static_assert(is_row_wise_expert<Expert>, "smear::layer::decoder: the expert must act on each token alone");
      if (length_ == 0)
        throw value_error("smear::layer::decoder: decoding reuses each segment's merged expert; the layer needs "
                          "router_options::segment_length > 0");
      if (batch_ == 0) throw value_error("smear::layer::decoder: empty batch");
      previous_.resize(batch_ * length_ * l.input_dim());
      current_.resize(previous_.size());
    }

    /// y ← the block's output for the next token of every sequence: x is [B, input_dim], y
    /// [B, output_dim]. Throws state_error in training mode, shape_error for wrong sizes, in
    /// checked mode numeric_error for a non-finite x (or parameter, when it merges), changing
    /// nothing.
    void step(std::span<const T> x, std::span<T> y) { layer_->decode(*this, x, y); }
    /// Tokens decoded so far.
    std::size_t position() const noexcept { return position_; }
    /// Merges done so far: one per segment begun, and one more per change of the parameters.
    std::size_t merges() const noexcept { return merges_; }
    /// The routing distribution of the current segment, [B, N].
    matrix_ref<const T> routing() const noexcept { return ws_.routing(); }
    /// Back to position 0 (new sequences).
    void reset() noexcept { position_ = 0; }
    /// Bytes of its buffers.
    std::size_t bytes() const noexcept { return ws_.bytes() + sizeof(T) * (previous_.capacity() + current_.capacity()); }

   private:
    friend class layer;
    const layer* layer_;
    workspace ws_;
    std::vector<T> previous_, current_;  ///< [B, ℓ, d]: the tokens of the previous and current segments
    std::size_t batch_, length_, position_ = 0, merges_ = 0;
    std::uint64_t merged_at_ = 0;        ///< the parameter version of the current merge
  };

  /// A block of N experts shaped like `prototype`, initialised from `seed`. Throws value_error
  /// for an invalid option, or when residual is asked for an expert whose input and output
  /// dimensions differ.
  explicit layer(Expert prototype, layer_options options = {}, std::uint64_t seed = 0)
      : core(std::move(prototype), options, seed) {}

  expert_bank<Expert, N>& bank() noexcept {
    this->touch();
    return this->bank_;
  }
  const expert_bank<Expert, N>& bank() const noexcept { return this->bank_; }
  smear::router<T>& router() noexcept {
    this->touch();
    return this->router_;
  }
  const smear::router<T>& router() const noexcept { return this->router_; }

  /// Every trainable tensor: the expert bank ("experts", decayed), the router's tensors when
  /// the strategy has a router ("router.*"), the skills ("skills.logits"), the learned
  /// REINFORCE baseline ("baseline.parameters", trained on its own squared error) and Soft
  /// MoE's tensors ("soft_moe.weight" Φ, decayed, and "soft_moe.scale").
  parameter_list<T> parameters() {
    this->touch();
    parameter_list<T> out;
    auto v = this->bank_.values(), g = this->bank_.gradients();
    out.push_back({"experts", {v.data, v.rows * v.cols}, {g.data, g.rows * g.cols}, true, false, {N, v.cols}});
    if (this->uses_router()) this->router_.append_parameters(out, "router.");
    this->planner_->append_parameters(out);
    return out;
  }

  /// Sets every gradient to zero.
  void zero_grad() noexcept {
    this->bank_.zero_grad();
    this->router_.zero_grad();
    this->planner_->zero_grad();
  }

  /// The distribution over experts of the last forward, [B, N]: the router's (after expert
  /// dropout) for smear, ensemble and top-k (DSelect-k: its selection weights, normalised),
  /// one-hot for tag and hash routing, the allocation for latent skills, the share of
  /// parameter groups per expert for AdaMix in training (uniform at inference), each expert's
  /// mean combine weight over the example's tokens for Soft MoE. Under segment routing one row
  /// per segment: row b·S + s for segment s of example b.
  matrix_ref<const T> routing() const noexcept { return probabilities(this->plan_, route_); }

  /// The router's logits z of the last forward (before the temperature), [B, K], for the
  /// strategies that ran the router.
  matrix_ref<const T> logits() const noexcept { return this->router_.logits(route_); }

  /// The experts each example of the last forward ran, [B, k] (k = 1 except top-k routing):
  /// the chosen ones for discrete strategies, the most probable one for soft strategies.
  matrix_ref<const std::int32_t> choices() const noexcept { return choices_of(this->plan_); }

  /// Bytes of the per-call buffers the layer holds now (merged parameters, saved activations,
  /// per-thread scratch, expert outputs for mixtures, the inference cache, the router's and
  /// the planner's).
  std::size_t workspace_bytes() const noexcept {
    return buf_.bytes() + route_.bytes() + plan_bytes(this->plan_) + cache_.bytes() +
           this->planner_->workspace_bytes();
  }

  /// y ← block(x). `x` is [B, L, input_dim] with per-example lengths; `y` has B·L·output_dim
  /// values and is written in full (padding rows are zero). `in` carries what some strategies
  /// need: tags (tag, latent skills, task routing), token or example ids (hash). Throws
  /// shape_error / value_error before any work on a bad shape or input; in checked mode
  /// numeric_error (see check_finite in layer_options).
  void forward(tokens<const T> x, std::span<T> y, route_inputs in = {}) {
    constexpr const char* op = "smear::layer::forward";
    const backend::thread_limit threads(this->opt_.threads);
    auto ctx = this->check_forward(x, y.size(), in, op);
    if (this->opt_.check_finite) check_forward_finite(x, *this->planner_, op);
    this->begin_forward();
    run_forward({this->plan_, route_, buf_}, *this->planner_, this->gen_, ctx, x, y, op);
    this->end_forward(x);
  }

  /// y ← block(x) on a layer in evaluation mode, writing only `ws`: any number of threads may
  /// call it at once on one layer, each with its own workspace, and get what forward() gives
  /// (bit for bit). No backward follows it; the layer's routing() and choices() do not see
  /// it (ws.routing(), ws.choices() do). Throws state_error in training mode, otherwise as
  /// forward().
  void forward(workspace& ws, tokens<const T> x, std::span<T> y, route_inputs in = {}) const {
    constexpr const char* op = "smear::layer::forward (shared)";
    const backend::thread_limit threads(this->opt_.threads);
    if (this->training_)
      throw state_error(detail::message(op, ": the shared forward is for evaluation: call train(false) first"));
    refresh_planner(ws);
    auto ctx = this->check_forward(x, y.size(), in, op);
    if (this->opt_.check_finite) check_forward_finite(x, *ws.planner_, op);
    run_forward({ws.plan_, ws.route_, ws.buf_}, *ws.planner_, ws.gen_, ctx, x, y, op);
  }

  /// Given dy = ∂ℓ/∂y for the last forward, overwrites dx (B·L·input_dim values) with ∂ℓ/∂x
  /// and adds the parameters' gradients into their gradient buffers. Must follow a forward,
  /// once. REINFORCE in training needs `example_losses`: each example's loss ℓ_b ([B]); its
  /// router gradient is that of the batch mean, mean_b (ℓ_b − baseline_b)·∇ log p_b(e_b).
  void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses = {}) {
    constexpr const char* op = "smear::layer::backward";
    const backend::thread_limit threads(buf_.threads);  // at most the forward's: its buffers are per thread
    this->check_backward(dy.size(), dx.size(), example_losses, op);
    const tokens<const T> x = this->last_;
    if (this->opt_.check_finite) {
      check_rows_finite(x, dy, this->output_dim(), op, "dy");
      detail::check_finite<T>(example_losses, op, "example_losses");
    }
    this->begin_backward();
    buf_.dw_ready = false;
    const Backend be{};
    frame f{this->plan_, route_, buf_};
    const tokens<const T> u = this->units(x, buf_.units);  // the executor's view (segment routing)
    const tokens<T> dxt{dx.data(), u.batch, u.length, this->input_dim(), u.lengths};
    const tokens<T> dx_router{dx.data(), x.batch, x.length, this->input_dim(), x.lengths};
    const auto& p = this->plan_;
    const feedback_needs needs = this->planner_->needs(p, this->was_training_);
    plan_feedback<T> fb = this->feedback(repeat_per_unit(example_losses, u.batch / x.batch, buf_.units.losses));
    if (needs.features) fb.features = this->router_.features(route_);
    if (p.kind == plan_kind::soft) {
      backward_soft(be, x, dy, dxt);
    } else if (p.kind == plan_kind::mixture) {
      backward_mixture(be, f, u, dy, dxt);
      fb.dcoef = {buf_.dcoef.data(), u.batch, p.slots};
    } else {
      backward_experts(be, f, u, dy, dxt);
      bank_backward(be, f);
      if (needs.dweights) fb.dweights = dweights(be, f);
    }
    switch (this->planner_->backward(p, fb)) {
      case router_gradient::none: break;
      case router_gradient::measured:
        this->router_.backward(be, p.kind == plan_kind::mixture ? scatter_dcoef(f) : dweights(be, f), dx_router,
                               route_);
        break;
      case router_gradient::probabilities:
        this->router_.backward(be, this->planner_->gradient(), dx_router, route_);
        break;
      case router_gradient::logits:
        this->router_.backward_logits(be, this->planner_->gradient(), dx_router, route_);
        break;
    }
    if (this->opt_.check_finite) {
      // inputs and parameters were finite: a non-finite value here arose in the computation
      check_rows_finite(tokens<const T>{dx.data(), x.batch, x.length, this->input_dim(), x.lengths},
                        std::span<const T>(dx), this->input_dim(), op, "dx");
      check_parameters_finite(this->bank_.gradients(), this->router_.gradients(), op, "gradient");
    }
  }

 private:
  std::size_t P() const noexcept { return this->bank_.parameter_count(); }
  /// Experts one example may run: the plan's slots for a mixture, else 1.
  static std::size_t slots(const routing_plan<T>& p) noexcept { return p.kind == plan_kind::mixture ? p.slots : 1; }
  static bool cached(const routing_plan<T>& p) noexcept { return p.kind == plan_kind::merge && p.table_rows > 0; }
  static std::size_t plan_bytes(const routing_plan<T>& p) noexcept {
    return sizeof(T) * (p.weights.capacity() + p.table.capacity() + p.coef.capacity()) +
           sizeof(std::int32_t) * (p.choices.capacity() + p.expert.capacity()) +
           sizeof(std::size_t) * p.count.capacity();
  }
  /// The distribution over experts a plan reports (the router's p, [B, N], when by_router).
  static matrix_ref<const T> probabilities(const routing_plan<T>& p,
                                           const typename smear::router<T>::workspace& route) noexcept {
    if (p.by_router) return {route.used.data(), p.batch, N};
    return p.weight_matrix();
  }
  static matrix_ref<const std::int32_t> choices_of(const routing_plan<T>& p) noexcept {
    return {p.choices.data(), p.batch, p.choice_cols};
  }

  /// A workspace's copy of the planner, taken again when the layer's parameters changed.
  void refresh_planner(workspace& ws) const {
    if (!ws.planner_ || ws.planner_version_ != this->version_) {
      ws.planner_ = this->planner_->clone();
      ws.planner_version_ = this->version_;
    }
  }

  // ---- decoding -------------------------------------------------------------------------

  void decode(decoder& dec, std::span<const T> x, std::span<T> y) const {
    constexpr const char* op = "smear::layer::decoder::step";
    const backend::thread_limit threads(this->opt_.threads);
    if (this->training_)
      throw state_error(detail::message(op, ": decoding is for evaluation: call train(false) first"));
    const std::size_t B = dec.batch_, din = this->input_dim(), ell = dec.length_;
    if (x.size() != B * din || y.size() != B * this->output_dim())
      throw shape_error(detail::message(op, ": x has ", x.size(), " and y ", y.size(), " values, expected [B, d] = ",
                                        detail::shape(B, din), " and ", detail::shape(B, this->output_dim())));
    const std::size_t t = dec.position_ % ell;
    const bool merge = t == 0 || dec.merged_at_ != this->version_;  // a new segment, or new parameters
    if (this->opt_.check_finite) {
      detail::check_finite<T>(x, op, "x");
      if (merge) check_parameters_finite(this->bank_.values(), this->router_.values(), op, "parameter");
    }
    workspace& ws = dec.ws_;
    frame f{ws.plan_, ws.route_, ws.buf_};
    const Backend be{};
    if (t == 0 && dec.position_ > 0) std::swap(dec.previous_, dec.current_);
    if (merge) {  // route and merge
      refresh_planner(ws);
      route_context<T> ctx{.batch = B, .length = ell, .training = false, .step = this->steps_};
      ctx.inv_temperature = static_cast<T>(1.0 / this->router_.options().temperature);
      if (ws.planner_->router(ctx) != router_use::none) {
        const bool first = dec.position_ < ell;
        this->router_.pool_segments(be, B, first ? tokens<const T>{} : tokens<const T>{dec.previous_.data(), B, ell, din},
                                    f.route);
        this->router_.route(be, false, ws.gen_, f.route);
        ctx.logits = this->router_.logits(f.route);
        ctx.probabilities = this->router_.probabilities(f.route);
      }
      ws.planner_->plan(ctx, ws.gen_, f.plan);
      prepare(be, f, B, 1);
      dec.merged_at_ = this->version_;
      ++dec.merges_;
    }
    for (std::size_t b = 0; b < B; ++b) std::copy_n(x.data() + b * din, din, dec.current_.data() + (b * ell + t) * din);
    const tokens<const T> xt{x.data(), B, 1, din, {}};
    if (f.plan.kind == plan_kind::mixture)
      apply_mixture(be, f, xt, y);
    else
      apply(be, f, xt, y);
    ++dec.position_;
  }

  // ---- checked mode --------------------------------------------------------------------

  /// Throws numeric_error naming the first non-finite value among what a forward of `x`
  /// reads: the rows of x the layer reads (the valid ones; every row when the router pools
  /// over all positions), the experts' and the router's parameters, the planner's tensors.
  void check_forward_finite(tokens<const T> x, planner<T>& pl, const char* op) const {
    const bool all_rows = this->router_.options().pool == pooling::mean &&
                          (this->uses_router() || pl.reads_pooled());
    check_rows_finite(all_rows ? tokens<const T>{x.data, x.batch, x.length, x.dim, {}} : x,
                      std::span<const T>(x.data, x.size()), x.dim, op, "x");
    check_parameters_finite(this->bank_.values(), this->router_.values(), op, "parameter");
    parameter_list<T> own;
    pl.append_parameters(own);
    for (const auto& t : own) detail::check_finite<T>(t.value, op, t.name.c_str());
  }
  /// The valid rows of a [B, L, width] tensor laid out like `x`.
  static void check_rows_finite(tokens<const T> x, std::span<const T> v, std::size_t width, const char* op,
                                const char* what) {
    for (std::size_t b = 0; b < x.batch; ++b)
      for (std::size_t i = 0; i < x.valid(b) * width; ++i) {
        const T value = v[(b * x.length) * width + i];
        if (!std::isfinite(value))
          throw numeric_error(detail::message(op, ": ", what, " holds ", value, " at example ", b, ", token ",
                                              i / width, ", feature ", i % width));
      }
  }
  /// The bank's and the router's tensors (values or gradients), by name.
  void check_parameters_finite(matrix_ref<const T> bank, std::span<const T> router, const char* op,
                               const char* what) const {
    for (std::size_t e = 0; e < N; ++e)
      for (const auto& s : this->bank_.layout())
        for (std::size_t i = 0; i < s.size(); ++i)
          if (const T v = bank(e, s.offset + i); !std::isfinite(v))
            throw numeric_error(detail::message(op, ": ", what, " experts.", s.name, " of expert ", e, " holds ",
                                                v, " at flat index ", i, " of ", s.size()));
    if (!this->uses_router()) return;
    for (const auto& s : this->router_.layout())
      for (std::size_t i = 0; i < s.size(); ++i)
        if (const T v = router[s.offset + i]; !std::isfinite(v))
          throw numeric_error(detail::message(op, ": ", what, " router.", s.name, " holds ", v, " at flat index ",
                                              i, " of ", s.size()));
  }

  // ---- executing a plan, forward -------------------------------------------------------

  /// The router, the plan, then its execution, into `f`. The router reads the batch as it
  /// is; the planner and the executor see its routing units (the examples, or their segments).
  void run_forward(frame f, planner<T>& pl, rng& gen, route_context<T> ctx, tokens<const T> x, std::span<T> y,
                   const char* op) const {
    const Backend be{};
    const tokens<const T> u = this->units(x, ctx, f.buf.units);
    const router_use use = pl.router(ctx);
    const std::size_t S = u.batch / x.batch;  // routing units per example
    if (use != router_use::none) {
      const bool dropout = ctx.training && use == router_use::with_dropout;
      this->draw_for_replicas(ctx, S, this->router_.draws(dropout), gen,
                              [&] { this->router_.forward(be, x, dropout, gen, f.route); });
      ctx.logits = this->router_.logits(f.route);
      ctx.probabilities = this->router_.probabilities(f.route);
    } else if (pl.reads_pooled()) {
      ctx.pooled = this->router_.pool(be, x, f.route);
    }
    this->draw_for_replicas(ctx, S, pl.draws(ctx), gen, [&] { pl.plan(ctx, gen, f.plan); });
    if (f.plan.kind == plan_kind::soft) return run_soft(be, f, pl, x, y, op);
    prepare(be, f, u.batch, u.length);
    if (f.plan.kind == plan_kind::mixture)
      apply_mixture(be, f, u, y);
    else
      apply(be, f, u, y);
    if (this->opt_.check_finite)  // inputs and parameters were finite: it arose in the computation
      check_rows_finite(x, std::span<const T>(y), this->output_dim(), op, "y");
  }

  /// Sizes the buffers for B units of up to L tokens and readies the plan's parameters: the
  /// merged or gathered experts, or the mixture's slots.
  void prepare(const Backend& be, frame f, std::size_t B, std::size_t L) const {
    reserve(f, B, L);
    if (f.plan.by_router) detail::argmax_rows<T>(this->router_.probabilities(f.route), f.plan.choices);
    switch (f.plan.kind) {
      case plan_kind::merge: merge(be, f); break;
      case plan_kind::gather: gather(f); break;
      case plan_kind::mixture: select_slots(f); break;
      case plan_kind::soft: break;  // run_soft
    }
  }

  /// A soft plan: Soft MoE with the planner's tensors; routing() reports each expert's mean
  /// combine weight.
  void run_soft(const Backend& be, frame f, planner<T>& pl, tokens<const T> x, std::span<T> y, const char* op) const {
    const auto& soft = soft_moe_of(pl);
    soft.forward(be, this->bank_.expert(), matrix_ref<const T>(this->bank_.values()), x, y, this->residual_,
                 f.buf.soft);
    soft.expert_shares(x, f.buf.soft, f.plan.weight_matrix());
    detail::argmax_rows<T>(std::as_const(f.plan).weight_matrix(), f.plan.choices);
    if (this->opt_.check_finite) check_rows_finite(x, std::span<const T>(y), this->output_dim(), op, "y");
  }

  void reserve(frame f, std::size_t B, std::size_t L) const {
    const Backend be{};
    const std::size_t threads = backend::max_threads(be), k = slots(f.plan);
    const auto& ex = this->bank_.expert();
    buffers& w = f.buf;
    w.threads = threads;
    w.saved_stride = ex.saved_size(L);
    // a run of the inference cache may hold the whole batch (group_runs)
    w.scratch_stride = ex.scratch_size(is_row_wise_expert<Expert> && cached(f.plan) ? B * L : L);
    grow(w.merged, B * P());
    grow(w.saved, B * k * w.saved_stride);
    grow(w.scratch, threads * w.scratch_stride);
    grow(w.dweights, B * N);
    if (w.theta.size() < B) w.theta.resize(B);
    if (f.plan.kind != plan_kind::mixture) grow(w.merged_grad, B * P());
    if (f.plan.kind == plan_kind::mixture) {
      grow(w.dparams, threads * P());
      grow(w.sel, B * k);
      grow(w.coef, B * k);
      grow(w.count, B);
      grow(w.dcoef, B * k);
      grow(w.outputs, B * k * L * this->output_dim());
      grow(w.dxtmp, threads * L * this->input_dim());
      grow(w.dbank, threads * N * P());
      grow(w.touched, threads * N);
    }
  }
  template <class V>
  static void grow(std::vector<V>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
  matrix_ref<T> merged(frame f) const noexcept { return {f.buf.merged.data(), f.plan.batch, P()}; }
  matrix_ref<T> merged_grad(frame f) const noexcept { return {f.buf.merged_grad.data(), f.plan.batch, P()}; }
  std::span<T> saved(frame f, std::size_t slot, std::size_t rows) const noexcept {
    return {f.buf.saved.data() + slot * f.buf.saved_stride, this->bank_.expert().saved_size(rows)};
  }
  std::span<T> scratch(frame f, std::size_t thread, std::size_t rows) const noexcept {
    return {f.buf.scratch.data() + thread * f.buf.scratch_stride, this->bank_.expert().scratch_size(rows)};
  }
  std::span<const T> bank_row(std::size_t e) const noexcept { return this->bank_.values().row(e); }

  /// θ̄ = W·Θ for the batch, or through the plan's table: each row merged once and cached.
  void merge(const Backend& be, frame f) const {
    const auto& p = f.plan;
    const std::size_t B = p.batch;
    if (p.table_rows == 0) {
      backend::gemm<T>(be, false, false, T(1), probabilities(p, f.route), matrix_ref<const T>(this->bank_.values()),
                       T(0), merged(f));
      for (std::size_t b = 0; b < B; ++b) f.buf.theta[b] = f.buf.merged.data() + b * P();
      return;
    }
    f.buf.cache = cache_.get(this->version_, std::span<const T>(p.table.data(), p.table_rows * N),
                             [&](cache_entry& e) {
                               e.values.resize(p.table_rows * P());
                               backend::gemm<T>(be, false, false, T(1),
                                                matrix_ref<const T>{e.table.data(), p.table_rows, N},
                                                matrix_ref<const T>(this->bank_.values()), T(0),
                                                matrix_ref<T>{e.values.data(), p.table_rows, P()});
                               ++this->cache_builds_;
                             });
    for (std::size_t b = 0; b < B; ++b) f.buf.theta[b] = f.buf.cache->values.data() + p.table_row[b] * P();
  }

  /// Each example's parameter groups copied from their experts (one whole expert: its row).
  void gather(frame f) const {
    const auto& p = f.plan;
    const std::size_t G = p.groups.size();
    for (std::size_t b = 0; b < p.batch; ++b) {
      if (G == 1 && p.groups[0].size == P()) {
        f.buf.theta[b] = bank_row(static_cast<std::size_t>(p.expert[b])).data();
        continue;
      }
      std::span<T> row = merged(f).row(b);
      for (std::size_t g = 0; g < G; ++g)
        std::copy_n(bank_row(static_cast<std::size_t>(p.expert[b * G + g])).data() + p.groups[g].offset,
                    p.groups[g].size, row.data() + p.groups[g].offset);
      f.buf.theta[b] = row.data();
    }
  }

  /// The slots a mixture runs: the plan's, or for a by-router mixture every expert with p > 0.
  void select_slots(frame f) const {
    const auto& p = f.plan;
    const std::size_t k = p.slots;
    buffers& w = f.buf;
    if (!p.by_router) {
      std::copy_n(p.expert.data(), p.batch * k, w.sel.data());
      std::copy_n(p.coef.data(), p.batch * k, w.coef.data());
      std::copy_n(p.count.data(), p.batch, w.count.data());
      return;
    }
    const auto pr = this->router_.probabilities(f.route);
    for (std::size_t b = 0; b < p.batch; ++b) {
      std::size_t n = 0;
      for (std::size_t e = 0; e < N; ++e)
        if (pr(b, e) > T(0)) w.sel[b * k + n] = static_cast<std::int32_t>(e), w.coef[b * k + n++] = pr(b, e);
      w.count[b] = n;
    }
  }

  /// Below this many multiply-adds (valid rows × P × experts run) a batch stays on one thread:
  /// waking the others would cost more than it saves.
  static constexpr std::size_t parallel_work = std::size_t{1} << 18;

  /// Consecutive examples that one call of the expert takes as one block of rows: in the
  /// inference cache, with a row-wise expert, examples sharing a merged expert whose rows are
  /// contiguous (each but the last is full length). Elsewhere each example is its own run.
  /// runs holds the first example of each run, then B.
  static void group_runs(frame f, tokens<const T> x) {
    auto& runs = f.buf.runs;
    const auto& theta = f.buf.theta;
    runs.clear();
    const bool grouped = is_row_wise_expert<Expert> && cached(f.plan);
    for (std::size_t b = 0; b < x.batch; ++b)
      if (!(grouped && b > 0 && theta[b] == theta[runs.back()] && x.valid(b - 1) == x.length)) runs.push_back(b);
    runs.push_back(x.batch);
  }
  static std::size_t run_rows(tokens<const T> x, std::size_t first, std::size_t last) {
    return (last - first - 1) * x.length + x.valid(last - 1);
  }

  /// f(first, last, thread) for each run, spread over threads when there is enough work.
  template <class F>
  void for_each_run(const Backend& be, frame f, tokens<const T> x, F&& fn) const {
    const auto& runs = f.buf.runs;
    const std::size_t count = runs.size() - 1;
    std::size_t rows = 0;
    for (std::size_t b = 0; b < x.batch; ++b) rows += x.valid(b);
    const auto run = [&](std::size_t r, std::size_t thread) { fn(runs[r], runs[r + 1], thread); };
    if (count == 1 || rows * P() < parallel_work) {
      for (std::size_t r = 0; r < count; ++r) run(r, std::size_t{0});
      return;
    }
    backend::parallel_for(be, count, run);
  }

  /// fn(b, thread) for every example of a mixture, spread over the backend's threads when the
  /// batch is worth it.
  template <class F>
  void for_each_example(const Backend& be, frame f, tokens<const T> x, F&& fn) const {
    std::size_t rows = 0;
    for (std::size_t b = 0; b < x.batch; ++b) rows += x.valid(b) * f.buf.count[b];
    if (rows * P() < parallel_work) {
      for (std::size_t b = 0; b < x.batch; ++b) fn(b, std::size_t{0});
      return;
    }
    backend::parallel_for(be, x.batch, std::forward<F>(fn));
  }

  void apply(const Backend& be, frame f, tokens<const T> x, std::span<T> y) const {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), L = x.length;
    group_runs(f, x);
    for_each_run(be, f, x, [&](std::size_t first, std::size_t last, std::size_t) {
      const std::size_t rows = run_rows(x, first, last);
      matrix_ref<const T> xb{x.data + first * L * din, rows, din};
      matrix_ref<T> yb{y.data() + first * L * dout, rows, dout};
      ex.forward(be, std::span<const T>(f.buf.theta[first], P()), xb, yb, saved(f, first, rows));
      if (this->residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(xb.data, rows * din), {yb.data, rows * dout});
      std::fill(yb.data + rows * dout, y.data() + last * L * dout, T(0));
    });
  }

  void apply_mixture(const Backend& be, frame f, tokens<const T> x, std::span<T> y) const {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), k = slots(f.plan), L = x.length;
    const buffers& w = f.buf;
    for_each_example(be, f, x, [&](std::size_t b, std::size_t) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      std::span<T> yb{y.data() + b * L * dout, rows * dout};
      if (this->residual_)
        std::copy_n(xb.data, rows * din, yb.data());
      else
        std::fill(yb.begin(), yb.end(), T(0));
      for (std::size_t j = 0; j < w.count[b]; ++j) {
        const std::size_t slot = b * k + j;
        matrix_ref<T> out{f.buf.outputs.data() + slot * L * dout, rows, dout};
        ex.forward(be, bank_row(static_cast<std::size_t>(w.sel[slot])), xb, out, saved(f, slot, rows));
        backend::axpy<T>(be, w.coef[slot], std::span<const T>(out.data, rows * dout), yb);
      }
      std::fill(y.data() + b * L * dout + rows * dout, y.data() + (b + 1) * L * dout, T(0));
    });
  }

  // ---- backward ------------------------------------------------------------------------

  /// Expert backward for the single-parameter-vector plans (merge, gather): ∂ℓ/∂x into dx and
  /// G_b = ∂ℓ/∂θ_b into row b of merged_grad().
  void backward_experts(const Backend& be, frame f, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), L = x.length;
    for_each_run(be, f, x, [&](std::size_t first, std::size_t last, std::size_t thread) {
      const std::size_t rows = run_rows(x, first, last);
      matrix_ref<const T> xb{x.data + first * L * din, rows, din};
      matrix_ref<const T> dyb{dy.data() + first * L * dout, rows, dout};
      matrix_ref<T> dxb{dx.data + first * L * din, rows, din};
      // the run's first row gets its gradient; its other rows get 0 (a run shares θ̄ and
      // its routing weights, so the first row's G is the run's)
      ex.backward(be, std::span<const T>(f.buf.theta[first], P()), xb, std::span<const T>(saved(f, first, rows)),
                  dyb, dxb, merged_grad(f).row(first), scratch(f, thread, rows));
      if (this->residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(dyb.data, rows * dout), {dxb.data, rows * din});
      std::fill(dxb.data + rows * din, dx.data + last * L * din, T(0));
      for (std::size_t b = first + 1; b < last; ++b) std::ranges::fill(merged_grad(f).row(b), T(0));
    });
  }

  /// From G (rows of merged_grad()) to the bank's gradient: Wᵀ·G for a merge, a scatter of each
  /// group to its expert for a gather.
  void bank_backward(const Backend& be, frame f) {
    const auto& p = f.plan;
    const matrix_ref<const T> grad_merged = merged_grad(f);
    auto bank_grad = this->bank_.gradients();
    if (p.kind == plan_kind::merge) {
      backend::gemm<T>(be, true, false, T(1), probabilities(p, f.route), grad_merged, T(1), bank_grad);
      return;
    }
    const std::size_t G = p.groups.size();
    for (std::size_t b = 0; b < p.batch; ++b)
      for (std::size_t g = 0; g < G; ++g)
        backend::axpy<T>(be, T(1), grad_merged.row(b).subspan(p.groups[g].offset, p.groups[g].size),
                         bank_grad.row(static_cast<std::size_t>(p.expert[b * G + g]))
                             .subspan(p.groups[g].offset, p.groups[g].size));
  }

  /// ∂ℓ/∂W = G·Θᵀ of the last merge, [B, N] (computed once per backward).
  matrix_ref<const T> dweights(const Backend& be, frame f) const {
    matrix_ref<T> dw{f.buf.dweights.data(), f.plan.batch, N};
    if (!f.buf.dw_ready) {
      backend::gemm<T>(be, false, true, T(1), matrix_ref<const T>(merged_grad(f)),
                       matrix_ref<const T>(this->bank_.values()), T(0), dw);
      f.buf.dw_ready = true;
    }
    return dw;
  }

  /// A by-router mixture's slot dot products as ∂ℓ/∂p, [B, N].
  static matrix_ref<const T> scatter_dcoef(frame f) {
    matrix_ref<T> dp{f.buf.dweights.data(), f.plan.batch, N};
    const std::size_t k = slots(f.plan);
    for (std::size_t b = 0; b < f.plan.batch; ++b) {
      std::fill_n(dp.row(b).data(), N, T(0));
      for (std::size_t j = 0; j < f.buf.count[b]; ++j)
        dp(b, static_cast<std::size_t>(f.buf.sel[b * k + j])) = f.buf.dcoef[b * k + j];
    }
    return dp;
  }

  /// Mixture backward: each run expert's backward, scaled by its coefficient; dcoef gets
  /// ⟨dy_b, f(x_b; θ_e)⟩, the gradient of each coefficient.
  void backward_mixture(const Backend& be, frame f, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), k = slots(f.plan), L = x.length,
                      threads = backend::max_threads(be);
    buffers& w = f.buf;
    // each thread's accumulator row for expert e is written by the first example that ran e on it
    std::fill_n(w.touched.data(), threads * N, char{0});
    for_each_example(be, f, x, [&](std::size_t b, std::size_t thread) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      matrix_ref<const T> dyb{dy.data() + b * L * dout, rows, dout};
      std::span<T> dxb{dx.data + b * L * din, L * din};
      if (this->residual_) {
        std::copy_n(dyb.data, rows * dout, dxb.data());
        std::fill(dxb.begin() + static_cast<std::ptrdiff_t>(rows * din), dxb.end(), T(0));
      } else {
        std::fill(dxb.begin(), dxb.end(), T(0));
      }
      std::span<T> g{w.dparams.data() + thread * P(), P()};
      matrix_ref<T> dxe{w.dxtmp.data() + thread * L * din, rows, din};
      for (std::size_t j = 0; j < w.count[b]; ++j) {
        const std::size_t slot = b * k + j, e = static_cast<std::size_t>(w.sel[slot]);
        ex.backward(be, bank_row(e), xb, std::span<const T>(saved(f, slot, rows)), dyb, dxe, g,
                    scratch(f, thread, rows));
        backend::axpy<T>(be, w.coef[slot], std::span<const T>(dxe.data, rows * din), dxb.first(rows * din));
        std::span<T> acc{w.dbank.data() + (thread * N + e) * P(), P()};
        if (w.touched[thread * N + e]) {
          backend::axpy<T>(be, w.coef[slot], std::span<const T>(g), acc);
        } else {
          w.touched[thread * N + e] = 1;
          std::transform(g.begin(), g.end(), acc.begin(), [c = w.coef[slot]](T v) { return c * v; });
        }
        const T* out = w.outputs.data() + slot * L * dout;
        T dot = 0;
        for (std::size_t i = 0; i < rows * dout; ++i) dot += dyb.data[i] * out[i];
        w.dcoef[slot] = dot;
      }
    });
    auto bank_grad = this->bank_.gradients();
    for (std::size_t t = 0; t < threads; ++t)
      for (std::size_t e = 0; e < N; ++e)
        if (w.touched[t * N + e])
          backend::axpy<T>(be, T(1), std::span<const T>(w.dbank.data() + (t * N + e) * P(), P()), bank_grad.row(e));
  }

  /// A soft plan's backward: Soft MoE's, into dx, the bank's and its own gradients.
  void backward_soft(const Backend& be, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    soft_moe_of(*this->planner_).backward(be, this->bank_.expert(), matrix_ref<const T>(this->bank_.values()),
                                          this->bank_.gradients(), x, dy, dx, this->residual_, buf_.soft);
  }

  typename smear::router<T>::workspace route_;  ///< the router's buffers of the layer's own forward
  buffers buf_;                                 ///< the executor's buffers of the layer's own forward
  mutable shared_cache cache_;                  ///< the inference cache, shared by every forward
};

}  // namespace smear
