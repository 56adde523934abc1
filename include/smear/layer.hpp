#pragma once
/// \file layer.hpp
/// A routing block of N experts on the host (reference and cpu backends), under any of the
/// strategies the SMEAR paper compares. The strategy's planner (smear/routing/) decides the
/// routing as a plan; this layer executes plans: it runs the router, merges, gathers or mixes
/// the experts, applies them, and goes back through all of it.

#include <algorithm>
#include <cstddef>
#include <cstdint>
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
/// separately and mix their outputs. A single expert and a parameter-matched dense adapter are
/// `layer<E, 1>` (with `adapter{d, N·m}` for the dense one), which runs its one expert
/// directly: no router, no merge.
///
/// Inference cache: plans that merge through a per-task table (latent skills and AdaMix in
/// evaluation, SMEAR after set_task_routing()) merge each row once and reuse the merged experts
/// until the table or a parameter may have changed: backward(), train(), parameters(), the
/// non-const bank()/router()/skills() accessors and invalidate_cache() all end their validity.
/// Call invalidate_cache() after writing parameters through spans obtained earlier.
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
  /// the strategy has a router ("router.*"), the skills ("skills.logits") and the learned
  /// REINFORCE baseline ("baseline.parameters", trained on its own squared error).
  parameter_list<T> parameters() {
    this->touch();
    parameter_list<T> out;
    auto v = this->bank_.values(), g = this->bank_.gradients();
    out.push_back({"experts", {v.data, v.rows * v.cols}, {g.data, g.rows * g.cols}, true});
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
  /// parameter groups per expert for AdaMix in training (uniform at inference).
  matrix_ref<const T> routing() const noexcept {
    if (this->plan_.by_router) return this->router_.probabilities();
    return this->plan_.weight_matrix();
  }

  /// The experts each example of the last forward ran, [B, k] (k = 1 except top-k routing):
  /// the chosen ones for discrete strategies, the most probable one for soft strategies.
  matrix_ref<const std::int32_t> choices() const noexcept {
    return {this->plan_.choices.data(), this->plan_.batch, this->plan_.choice_cols};
  }

  /// Bytes of the per-call buffers the layer holds now (merged parameters, saved activations,
  /// per-thread scratch, expert outputs for mixtures, the inference cache, the router's and
  /// the planner's).
  std::size_t workspace_bytes() const noexcept {
    const std::size_t values = merged_.capacity() + merged_grad_.capacity() + saved_.capacity() +
                               dparams_.capacity() + scratch_.capacity() + dweights_.capacity() + coef_.capacity() +
                               dcoef_.capacity() + outputs_.capacity() +
                               dxtmp_.capacity() + dbank_.capacity() + cache_.capacity() + cache_table_.capacity();
    const auto& p = this->plan_;
    return sizeof(T) * (values + p.weights.capacity() + p.table.capacity() + p.coef.capacity()) +
           sizeof(const T*) * theta_.capacity() +
           sizeof(std::int32_t) * (p.choices.capacity() + p.expert.capacity() + sel_.capacity()) +
           sizeof(std::size_t) * (count_.capacity() + runs_.capacity()) + touched_.capacity() +
           this->router_.workspace_bytes() + this->planner_->workspace_bytes();
  }

  /// y ← block(x). `x` is [B, L, input_dim] with per-example lengths; `y` has B·L·output_dim
  /// values and is written in full (padding rows are zero). `in` carries what some strategies
  /// need: tags (tag, latent skills, task routing), token or example ids (hash). Throws
  /// shape_error / value_error before any work on a bad shape or input, numeric_error in
  /// checked mode.
  void forward(tokens<const T> x, std::span<T> y, route_inputs in = {}) {
    constexpr const char* op = "smear::layer::forward";
    auto ctx = this->begin_forward(x, y.size(), in, op);
    if (this->opt_.check_finite) detail::check_finite<T>({x.data, x.size()}, op, "x");
    const Backend be{};
    const router_use use = this->planner_->router(ctx);
    if (use != router_use::none) {
      this->router_.forward(be, x, ctx.training && use == router_use::with_dropout, this->gen_);
      ctx.logits = this->router_.logits();
      ctx.probabilities = this->router_.probabilities();
    } else if (this->planner_->reads_pooled()) {
      ctx.pooled = this->router_.pool(be, x);
    }
    this->make_plan(ctx);
    reserve(x.batch, x.length);
    if (this->plan_.by_router) detail::argmax_rows<T>(this->router_.probabilities(), this->plan_.choices);
    switch (this->plan_.kind) {
      case plan_kind::merge: merge(be); break;
      case plan_kind::gather: gather(); break;
      case plan_kind::mixture: select_slots(); break;
    }
    if (this->plan_.kind == plan_kind::mixture)
      apply_mixture(be, x, y);
    else
      apply(be, x, y);
    if (this->opt_.check_finite) detail::check_finite<T>(std::span<const T>(y), op, "y");
    this->end_forward(x);
  }

  /// Given dy = ∂ℓ/∂y for the last forward, overwrites dx (B·L·input_dim values) with ∂ℓ/∂x
  /// and adds the parameters' gradients into their gradient buffers. Must follow a forward,
  /// once. REINFORCE in training needs `example_losses`: each example's loss ℓ_b ([B]); its
  /// router gradient is that of the batch mean, mean_b (ℓ_b − baseline_b)·∇ log p_b(e_b).
  void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses = {}) {
    constexpr const char* op = "smear::layer::backward";
    this->begin_backward(dy.size(), dx.size(), example_losses, op);
    if (this->opt_.check_finite) {
      detail::check_finite<T>(dy, op, "dy");
      detail::check_finite<T>(example_losses, op, "example_losses");
    }
    this->pending_backward_ = false;
    this->touch();
    dw_ready_ = false;
    const Backend be{};
    const tokens<const T> x = this->last_;
    const tokens<T> dxt{dx.data(), x.batch, x.length, this->input_dim(), x.lengths};
    const auto& p = this->plan_;
    const feedback_needs needs = this->planner_->needs(p, this->was_training_);
    plan_feedback<T> fb{.losses = example_losses, .training = this->was_training_};
    if (needs.features) fb.features = this->router_.features();
    if (p.kind == plan_kind::mixture) {
      backward_mixture(be, x, dy, dxt);
      fb.dcoef = {dcoef_.data(), x.batch, p.slots};
    } else {
      backward_experts(be, x, dy, dxt);
      bank_backward(be);
      if (needs.dweights) fb.dweights = dweights(be);
    }
    switch (this->planner_->backward(p, fb)) {
      case router_gradient::none: break;
      case router_gradient::measured:
        this->router_.backward(be, p.kind == plan_kind::mixture ? scatter_dcoef() : dweights(be), dxt);
        break;
      case router_gradient::probabilities: this->router_.backward(be, this->planner_->gradient(), dxt); break;
      case router_gradient::logits: this->router_.backward_logits(be, this->planner_->gradient(), dxt); break;
    }
    if (this->opt_.check_finite) {
      detail::check_finite<T>(std::span<const T>(dx), op, "dx");
      auto g = this->bank_.gradients();
      detail::check_finite<T>({g.data, g.rows * g.cols}, op, "expert gradients");
      detail::check_finite<T>(std::span<const T>(this->router_.gradients()), op, "router gradients");
    }
  }

 private:
  std::size_t P() const noexcept { return this->bank_.parameter_count(); }
  std::size_t batch() const noexcept { return this->plan_.batch; }
  /// Experts one example may run: the plan's slots for a mixture, else 1.
  std::size_t slots() const noexcept { return this->plan_.kind == plan_kind::mixture ? this->plan_.slots : 1; }
  bool cached() const noexcept { return this->plan_.kind == plan_kind::merge && this->plan_.table_rows > 0; }

  void reserve(std::size_t B, std::size_t L) {
    const Backend be{};
    const std::size_t threads = backend::max_threads(be), k = slots();
    const auto& ex = this->bank_.expert();
    saved_stride_ = ex.saved_size(L);
    // a run of the inference cache may hold the whole batch (group_runs)
    scratch_stride_ = ex.scratch_size(is_row_wise_expert<Expert> && cached() ? B * L : L);
    grow(merged_, B * P());
    grow(saved_, B * k * saved_stride_);
    grow(scratch_, threads * scratch_stride_);
    grow(dweights_, B * N);
    if (theta_.size() < B) theta_.resize(B);
    if (this->plan_.kind != plan_kind::mixture) grow(merged_grad_, B * P());
    if (this->plan_.kind == plan_kind::mixture) {
      grow(dparams_, threads * P());
      grow(sel_, B * k);
      grow(coef_, B * k);
      grow(count_, B);
      grow(dcoef_, B * k);
      grow(outputs_, B * k * L * this->output_dim());
      grow(dxtmp_, threads * L * this->input_dim());
      grow(dbank_, threads * N * P());
      grow(touched_, threads * N);
    }
  }
  template <class V>
  static void grow(std::vector<V>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
  matrix_ref<T> merged() noexcept { return {merged_.data(), batch(), P()}; }
  matrix_ref<T> merged_grad() noexcept { return {merged_grad_.data(), batch(), P()}; }
  std::span<T> saved(std::size_t slot, std::size_t rows) noexcept {
    return {saved_.data() + slot * saved_stride_, this->bank_.expert().saved_size(rows)};
  }
  std::span<T> scratch(std::size_t thread, std::size_t rows) noexcept {
    return {scratch_.data() + thread * scratch_stride_, this->bank_.expert().scratch_size(rows)};
  }
  std::span<const T> bank_row(std::size_t e) const noexcept { return this->bank_.values().row(e); }
  /// The weights a merge multiplies the bank with: [B, N].
  matrix_ref<const T> merge_weights() const noexcept { return routing(); }

  // ---- executing a plan, forward -------------------------------------------------------

  /// θ̄ = W·Θ for the batch, or through the plan's table: each row merged once and cached.
  void merge(const Backend& be) {
    const auto& p = this->plan_;
    const std::size_t B = batch();
    if (p.table_rows == 0) {
      backend::gemm<T>(be, false, false, T(1), merge_weights(), matrix_ref<const T>(this->bank_.values()), T(0),
                       merged());
      for (std::size_t b = 0; b < B; ++b) theta_[b] = merged_.data() + b * P();
      return;
    }
    if (!this->cache_valid(cache_version_, cache_table_)) {
      cache_table_ = p.table;
      cache_.resize(p.table_rows * P());
      backend::gemm<T>(be, false, false, T(1), matrix_ref<const T>{cache_table_.data(), p.table_rows, N},
                       matrix_ref<const T>(this->bank_.values()), T(0), matrix_ref<T>{cache_.data(), p.table_rows, P()});
      cache_version_ = this->version_;
      ++this->cache_builds_;
    }
    for (std::size_t b = 0; b < B; ++b) theta_[b] = cache_.data() + p.table_row[b] * P();
  }

  /// Each example's parameter groups copied from their experts (one whole expert: its row).
  void gather() {
    const auto& p = this->plan_;
    const std::size_t G = p.groups.size();
    for (std::size_t b = 0; b < batch(); ++b) {
      if (G == 1 && p.groups[0].size == P()) {
        theta_[b] = bank_row(static_cast<std::size_t>(p.expert[b])).data();
        continue;
      }
      std::span<T> row = merged().row(b);
      for (std::size_t g = 0; g < G; ++g)
        std::copy_n(bank_row(static_cast<std::size_t>(p.expert[b * G + g])).data() + p.groups[g].offset,
                    p.groups[g].size, row.data() + p.groups[g].offset);
      theta_[b] = row.data();
    }
  }

  /// The slots a mixture runs: the plan's, or for a by-router mixture every expert with p > 0.
  void select_slots() {
    const auto& p = this->plan_;
    const std::size_t k = p.slots;
    if (!p.by_router) {
      std::copy_n(p.expert.data(), batch() * k, sel_.data());
      std::copy_n(p.coef.data(), batch() * k, coef_.data());
      std::copy_n(p.count.data(), batch(), count_.data());
      return;
    }
    const auto w = this->router_.probabilities();
    for (std::size_t b = 0; b < batch(); ++b) {
      std::size_t n = 0;
      for (std::size_t e = 0; e < N; ++e)
        if (w(b, e) > T(0)) sel_[b * k + n] = static_cast<std::int32_t>(e), coef_[b * k + n++] = w(b, e);
      count_[b] = n;
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
    const bool grouped = is_row_wise_expert<Expert> && cached();
    for (std::size_t b = 0; b < x.batch; ++b)
      if (!(grouped && b > 0 && theta_[b] == theta_[runs_.back()] && x.valid(b - 1) == x.length)) runs_.push_back(b);
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
    if (runs == 1 || rows * P() < parallel_work) {
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
    if (rows * P() < parallel_work) {
      for (std::size_t b = 0; b < x.batch; ++b) f(b, std::size_t{0});
      return;
    }
    backend::parallel_for(be, x.batch, std::forward<F>(f));
  }

  void apply(const Backend& be, tokens<const T> x, std::span<T> y) {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), L = x.length;
    group_runs(x);
    for_each_run(be, x, [&](std::size_t first, std::size_t last, std::size_t) {
      const std::size_t rows = run_rows(x, first, last);
      matrix_ref<const T> xb{x.data + first * L * din, rows, din};
      matrix_ref<T> yb{y.data() + first * L * dout, rows, dout};
      ex.forward(be, std::span<const T>(theta_[first], P()), xb, yb, saved(first, rows));
      if (this->residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(xb.data, rows * din), {yb.data, rows * dout});
      std::fill(yb.data + rows * dout, y.data() + last * L * dout, T(0));
    });
  }

  void apply_mixture(const Backend& be, tokens<const T> x, std::span<T> y) {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), k = slots(), L = x.length;
    for_each_example(be, x, [&](std::size_t b, std::size_t) {
      const std::size_t rows = x.valid(b);
      matrix_ref<const T> xb = x.example(b).middle_rows(0, rows);
      std::span<T> yb{y.data() + b * L * dout, rows * dout};
      if (this->residual_)
        std::copy_n(xb.data, rows * din, yb.data());
      else
        std::fill(yb.begin(), yb.end(), T(0));
      for (std::size_t j = 0; j < count_[b]; ++j) {
        const std::size_t slot = b * k + j;
        matrix_ref<T> out{outputs_.data() + slot * L * dout, rows, dout};
        ex.forward(be, bank_row(static_cast<std::size_t>(sel_[slot])), xb, out, saved(slot, rows));
        backend::axpy<T>(be, coef_[slot], std::span<const T>(out.data, rows * dout), yb);
      }
      std::fill(y.data() + b * L * dout + rows * dout, y.data() + (b + 1) * L * dout, T(0));
    });
  }

  // ---- backward ------------------------------------------------------------------------

  /// Expert backward for the single-parameter-vector plans (merge, gather): ∂ℓ/∂x into dx and
  /// G_b = ∂ℓ/∂θ_b into row b of merged_grad().
  void backward_experts(const Backend& be, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), L = x.length;
    for_each_run(be, x, [&](std::size_t first, std::size_t last, std::size_t thread) {
      const std::size_t rows = run_rows(x, first, last);
      matrix_ref<const T> xb{x.data + first * L * din, rows, din};
      matrix_ref<const T> dyb{dy.data() + first * L * dout, rows, dout};
      matrix_ref<T> dxb{dx.data + first * L * din, rows, din};
      // the run's first row gets its gradient; its other rows get 0 (a run shares θ̄ and
      // its routing weights, so the first row's G is the run's)
      ex.backward(be, std::span<const T>(theta_[first], P()), xb, std::span<const T>(saved(first, rows)), dyb, dxb,
                  merged_grad().row(first), scratch(thread, rows));
      if (this->residual_)
        backend::axpy<T>(be, T(1), std::span<const T>(dyb.data, rows * dout), {dxb.data, rows * din});
      std::fill(dxb.data + rows * din, dx.data + last * L * din, T(0));
      for (std::size_t b = first + 1; b < last; ++b) std::ranges::fill(merged_grad().row(b), T(0));
    });
  }

  /// From G (rows of merged_grad()) to the bank's gradient: Wᵀ·G for a merge, a scatter of each
  /// group to its expert for a gather.
  void bank_backward(const Backend& be) {
    const auto& p = this->plan_;
    const matrix_ref<const T> grad_merged = merged_grad();
    auto bank_grad = this->bank_.gradients();
    if (p.kind == plan_kind::merge) {
      backend::gemm<T>(be, true, false, T(1), merge_weights(), grad_merged, T(1), bank_grad);
      return;
    }
    const std::size_t G = p.groups.size();
    for (std::size_t b = 0; b < batch(); ++b)
      for (std::size_t g = 0; g < G; ++g)
        backend::axpy<T>(be, T(1), grad_merged.row(b).subspan(p.groups[g].offset, p.groups[g].size),
                         bank_grad.row(static_cast<std::size_t>(p.expert[b * G + g]))
                             .subspan(p.groups[g].offset, p.groups[g].size));
  }

  /// ∂ℓ/∂W = G·Θᵀ of the last merge, [B, N] (computed once per backward).
  matrix_ref<const T> dweights(const Backend& be) {
    matrix_ref<T> dw{dweights_.data(), batch(), N};
    if (!dw_ready_) {
      backend::gemm<T>(be, false, true, T(1), matrix_ref<const T>(merged_grad()),
                       matrix_ref<const T>(this->bank_.values()), T(0), dw);
      dw_ready_ = true;
    }
    return dw;
  }

  /// A by-router mixture's slot dot products as ∂ℓ/∂p, [B, N].
  matrix_ref<const T> scatter_dcoef() {
    matrix_ref<T> dp{dweights_.data(), batch(), N};
    const std::size_t k = slots();
    for (std::size_t b = 0; b < batch(); ++b) {
      std::fill_n(dp.row(b).data(), N, T(0));
      for (std::size_t j = 0; j < count_[b]; ++j) dp(b, static_cast<std::size_t>(sel_[b * k + j])) = dcoef_[b * k + j];
    }
    return dp;
  }

  /// Mixture backward: each run expert's backward, scaled by its coefficient; dcoef_ gets
  /// ⟨dy_b, f(x_b; θ_e)⟩, the gradient of each coefficient.
  void backward_mixture(const Backend& be, tokens<const T> x, std::span<const T> dy, tokens<T> dx) {
    const Expert& ex = this->bank_.expert();
    const std::size_t din = this->input_dim(), dout = this->output_dim(), k = slots(), L = x.length,
                      threads = backend::max_threads(be);
    // each thread's accumulator row for expert e is written by the first example that ran e on it
    std::fill_n(touched_.data(), threads * N, char{0});
    for_each_example(be, x, [&](std::size_t b, std::size_t thread) {
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
      std::span<T> g{dparams_.data() + thread * P(), P()};
      matrix_ref<T> dxe{dxtmp_.data() + thread * L * din, rows, din};
      for (std::size_t j = 0; j < count_[b]; ++j) {
        const std::size_t slot = b * k + j, e = static_cast<std::size_t>(sel_[slot]);
        ex.backward(be, bank_row(e), xb, std::span<const T>(saved(slot, rows)), dyb, dxe, g, scratch(thread, rows));
        backend::axpy<T>(be, coef_[slot], std::span<const T>(dxe.data, rows * din), dxb.first(rows * din));
        std::span<T> acc{dbank_.data() + (thread * N + e) * P(), P()};
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
    auto bank_grad = this->bank_.gradients();
    for (std::size_t t = 0; t < threads; ++t)
      for (std::size_t e = 0; e < N; ++e)
        if (touched_[t * N + e])
          backend::axpy<T>(be, T(1), std::span<const T>(dbank_.data() + (t * N + e) * P(), P()), bank_grad.row(e));
  }

  // per-call buffers
  std::vector<std::size_t> runs_;  // see group_runs
  std::vector<T> merged_;       ///< [B, P]: θ̄_b, the merged (or gathered) parameters of example b
  std::vector<T> merged_grad_;  ///< [B, P]: G_b = ∂ℓ/∂θ̄_b (merge and gather plans)
  std::vector<T> dweights_;     ///< [B, N]: ∂ℓ/∂W measured for the router (G·Θᵀ, or a mixture's ⟨dy, f⟩)
  std::vector<T> dparams_;      ///< mixture [threads, P]: ∂ℓ/∂θ_e of the expert a thread ran last
  std::vector<T> saved_, scratch_, coef_, dcoef_, outputs_, dxtmp_, dbank_;
  std::vector<const T*> theta_;    ///< [B]: the parameters example b runs (merged_, cache_ or a bank row)
  std::vector<std::int32_t> sel_;  ///< mixture [B, k]: the expert of each slot
  std::vector<std::size_t> count_;
  std::vector<char> touched_;  ///< [threads, N]: which rows of dbank_ this backward wrote
  std::size_t saved_stride_ = 0, scratch_stride_ = 0;
  bool dw_ready_ = false;  ///< dweights_ holds this backward's ∂ℓ/∂W
  // the inference cache: the table it was merged from, at which parameter version
  std::vector<T> cache_, cache_table_;
  std::uint64_t cache_version_ = 0;
};

}  // namespace smear
