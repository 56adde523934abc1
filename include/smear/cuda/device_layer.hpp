#pragma once
/// \file cuda/device_layer.hpp
/// The cuda backend's routing block, written once against an execution context: with
/// device::context (cuBLAS + Thrust on a CUDA stream) it is `smear::layer<E, N, backend::cuda>`;
/// with device::host_context the same algorithm runs on a CPU, which the tests compare with the
/// reference backend on machines without a GPU. Like smear::layer it only executes the plans
/// of the strategy's planner (smear/routing/); the plans' small host data (weights, one-hot
/// selections, coefficients) go up per batch, and only what a planner reads on the host comes
/// back (nothing for smear and the ensemble, whose weights are the router's own probabilities).
///
/// Forward: the router (cuda/device_router.hpp), then a merge Θ̄ = W·Θ (one GEMM; through the
/// inference cache for per-task tables), a gather (one-hot GEMMs per parameter group) or a
/// mixture (per slot a one-hot GEMM of the chosen experts, or every expert for the ensemble),
/// the experts' strided-batched GEMMs over the padded length, residual and padding mask.
/// Backward: the experts' batched GEMMs give ∂ℓ/∂x and G = ∂ℓ/∂Θ̄; ∂ℓ/∂Θ += Wᵀ·G (or the
/// one-hot scatters); ∂ℓ/∂W = G·Θᵀ or the slots' ⟨dy, f⟩ for the planner and the router.
/// Soft MoE's plans run in cuda/device_soft_moe.hpp.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/backend/cuda/experts.hpp"
#include "smear/backend_concepts.hpp"
#include "smear/cuda/device_router.hpp"
#include "smear/cuda/device_soft_moe.hpp"
#include "smear/layer_core.hpp"

namespace smear::device {

/// A routing block of N experts whose parameters, gradients, activations and workspaces live
/// in `Ctx`'s memory. `x`, `y`, `dy` and `dx` passed to forward/backward are in that memory too
/// (device pointers for device::context); `lengths` and the route inputs stay on the host.
///
/// The parameters start exactly as those of `smear::layer<Expert, N>` built with the same
/// prototype, options and seed. bank() and router() are host mirrors: download() refreshes
/// them (values and gradients) from the device, upload() writes their values to the device.
/// The planner's own parameters (latent skills, a learned baseline) live on the host.
template <class Expert, std::size_t N, class Ctx>
class device_layer : public layer_core<Expert, N> {
  using core = layer_core<Expert, N>;
  template <class V>
  using buf = typename Ctx::template buffer<V>;
  static_assert(smear::detail::diagnose_execution_context<Ctx, typename Expert::value_type>());
  static_assert(smear::detail::diagnose_device_expert_kernel<device_expert<Expert, Ctx>, Ctx, typename Expert::value_type>());

 public:
  using typename core::T;
  using typename core::value_type;
  using context_type = Ctx;

  /// Builds the block and its context from `ctx_args`. Throws like smear::layer's constructor,
  /// and out_of_memory / cuda_error when the device cannot hold the parameters.
  template <class... CtxArgs>
  explicit device_layer(Expert prototype, layer_options options, std::uint64_t seed, CtxArgs&&... ctx_args)
      : core(std::move(prototype), options, seed),
        ctx_(std::make_unique<Ctx>(std::forward<CtxArgs>(ctx_args)...)),
        kernel_(this->bank_.expert(), *ctx_),
        router_dev_(this->router_) {
    bank_values_.reserve(N * P(), "the expert bank");
    bank_grads_.reserve(N * P(), "the expert bank's gradients");
    upload();
    zero_grad();
    ctx_->synchronize("smear cuda layer: construction");
  }

  Ctx& context() noexcept { return *ctx_; }

  /// Host mirror of the expert bank (see download() / upload()).
  expert_bank<Expert, N>& bank() noexcept { return this->bank_; }
  const expert_bank<Expert, N>& bank() const noexcept { return this->bank_; }
  /// Host mirror of the router (see download() / upload()).
  smear::router<T>& router() noexcept { return this->router_; }
  const smear::router<T>& router() const noexcept { return this->router_; }

  /// The parameters and gradients in the context's memory: bank [N, P], router (its layout()).
  matrix_ref<T> device_bank_values() noexcept { return {bank_values_.data(), N, P()}; }
  matrix_ref<T> device_bank_gradients() noexcept { return {bank_grads_.data(), N, P()}; }
  std::span<T> device_router_values() noexcept { return {router_dev_.values(), router_size()}; }
  std::span<T> device_router_gradients() noexcept { return {router_dev_.gradients(), router_size()}; }

  /// Writes the host mirrors' parameter values to the device (asynchronously on the stream);
  /// merged experts cached for inference are rebuilt at their next use.
  void upload() {
    ctx_->to_device(bank_values_.data(), static_cast<const T*>(this->bank_.values().data), N * P(),
                    "smear cuda layer: upload of the expert bank");
    ctx_->to_device(router_dev_.values(), this->router_.values().data(), router_size(),
                    "smear cuda layer: upload of the router");
    this->touch();
  }

  /// Refreshes the host mirrors' values and gradients from the device; waits for the stream.
  void download() {
    const char* op = "smear cuda layer: download of the parameters";
    ctx_->to_host(this->bank_.values().data, static_cast<const T*>(bank_values_.data()), N * P(), op);
    ctx_->to_host(this->bank_.gradients().data, static_cast<const T*>(bank_grads_.data()), N * P(), op);
    ctx_->to_host(this->router_.values().data(), static_cast<const T*>(router_dev_.values()), router_size(), op);
    ctx_->to_host(this->router_.gradients().data(), static_cast<const T*>(router_dev_.gradients()), router_size(), op);
  }

  /// Every trainable tensor, as smear::layer::parameters() names them: the bank and the router
  /// in the context's memory (on_device), the planner's own (skills, learned baseline) on the
  /// host. Step them with smear::device::adamw / sgd (smear/cuda/optimizers.hpp).
  parameter_list<T> parameters() {
    this->touch();
    parameter_list<T> out;
    out.push_back({"experts", {bank_values_.data(), N * P()}, {bank_grads_.data(), N * P()}, true, true, {N, P()}});
    if (this->uses_router())
      this->router_.append_parameters(out, "router.", device_router_values(), device_router_gradients(), true);
    this->planner_->append_parameters(out);
    return out;
  }

  /// Sets every gradient to zero (on the device, and the planner's on the host).
  void zero_grad() {
    this->planner_->zero_grad();
    detail::fill(ctx_->policy(), bank_grads_.data(), N * P(), T(0));
    detail::fill(ctx_->policy(), router_dev_.gradients(), router_size(), T(0));
  }

  /// The routing distribution of the last forward, [B, N], on the host (waits for the stream
  /// when it is the router's). See smear::layer::routing.
  matrix_ref<const T> routing() {
    const auto& p = this->plan_;
    if (p.kind == plan_kind::soft && !routing_valid_) soft_routing();
    if (!p.by_router) return p.weight_matrix();
    if (!routing_valid_) {
      routing_host_.resize(p.batch * N);
      ctx_->to_host(routing_host_.data(), router_dev_.probabilities(), p.batch * N,
                    "smear cuda layer: download of the routing");
      smear::detail::argmax_rows<T>(matrix_ref<const T>{routing_host_.data(), p.batch, N}, this->plan_.choices);
      routing_valid_ = true;
    }
    return {routing_host_.data(), p.batch, N};
  }
  /// The experts each example of the last forward ran, [B, k], on the host.
  matrix_ref<const std::int32_t> choices() {
    if (this->plan_.by_router || this->plan_.kind == plan_kind::soft) routing();
    return {this->plan_.choices.data(), this->plan_.batch, this->plan_.choice_cols};
  }

  /// Bytes of the per-call buffers held in the context's memory.
  std::size_t workspace_bytes() const noexcept {
    return sizeof(T) * (merged_.capacity() + gmerged_.capacity() + saved_.capacity() + scratch_.capacity() +
                        dy_masked_.capacity() + weights_.capacity() + onehot_.capacity() + coef_.capacity() +
                        outputs_.capacity() + dye_.capacity() + dxe_.capacity() + dslots_.capacity() +
                        cache_.capacity() + table_.capacity()) +
           sizeof(std::int32_t) * lengths_.capacity() + router_dev_.workspace_bytes() + units_.bytes() +
           soft_.workspace_bytes();
  }

  /// y ← block(x), enqueued on the context's stream. x [B, L, input_dim] and y (B·L·output_dim
  /// values) are in the context's memory, x.lengths on the host. Padding rows of x must be
  /// finite; padding rows of y are written as zero. Throws shape_error / value_error before any
  /// work on a bad shape or a host pointer, numeric_error in checked mode.
  void forward(tokens<const T> x, std::span<T> y, route_inputs in = {}) {
    constexpr const char* op = "smear::layer<cuda>::forward";
    auto c = this->check_forward(x, y.size(), in, op);
    if constexpr (requires { kernel_.check_input(x, op); }) kernel_.check_input(x, op);
    ctx_->check_pointer(x.data, op, "x");
    ctx_->check_pointer(y.data(), op, "y");
    if (this->opt_.check_finite) check_finite(x.data, x.size(), op, "x");
    this->begin_forward();
    // the planner and the executor see the routing units: the examples, or their segments
    const tokens<const T> u = this->units(x, c, units_);
    const std::size_t B = u.batch, L = u.length, S = u.batch / x.batch;
    const std::int32_t* lens = upload_lengths(u);
    const router_use use = this->planner_->router(c);
    if (use != router_use::none) {
      const bool dropout = c.training && use == router_use::with_dropout;
      this->draw_for_replicas(c, S, this->router_.draws(dropout), this->gen_, [&] {
        router_dev_.forward(*ctx_, this->router_, x.data, lens, B, L, S, dropout, this->gen_, op);
      });
      if (this->planner_->reads_router()) {  // the planner decides on the host
        const std::size_t K = this->router_.outputs();
        logits_host_.resize(B * K);
        probs_host_.resize(B * K);
        ctx_->to_host(logits_host_.data(), router_dev_.logits(), B * K, op);
        ctx_->to_host(probs_host_.data(), router_dev_.probabilities(), B * K, op);
        c.logits = {logits_host_.data(), B, K};
        c.probabilities = {probs_host_.data(), B, K};
      }
    } else if (this->planner_->reads_pooled()) {
      c.pooled = download(router_dev_.pool(*ctx_, this->router_, x.data, lens, B, L, S), B, this->input_dim(),
                          pooled_host_, op);
    }
    this->make_plan(c, S);
    routing_valid_ = false;
    reserve(B, L);
    const auto& p = this->plan_;
    if (p.kind == plan_kind::soft) {
      soft_.forward(*ctx_, soft_moe_of(*this->planner_), kernel_, static_cast<const T*>(bank_values_.data()), P(),
                    x.data, lens, B, L, this->output_dim(), this->residual_, y.data(), op);
    } else if (p.kind == plan_kind::mixture) {
      run_mixture(u, lens, y.data(), op);
    } else {
      if (p.kind == plan_kind::merge)
        merge(op);
      else
        gather(op);
      kernel_.forward(*ctx_, static_cast<const T*>(merged_.data()), P(), x.data, lens, B, L, y.data(), saved_.data());
      detail::finish_rows(ctx_->policy(), y.data(), static_cast<const T*>(nullptr), 0,
                          this->residual_ ? x.data : static_cast<const T*>(nullptr), lens, B, L, this->output_dim());
    }
    if (this->opt_.check_finite) check_finite(y.data(), y.size(), op, "y");
    last_lengths_ = lens;
    this->end_forward(x);
  }

  /// Given dy for the last forward (in the context's memory), overwrites dx with ∂ℓ/∂x and adds
  /// the parameters' gradients on the device. Padding rows of dy are ignored; those of dx are
  /// written as zero. Must follow a forward, once. REINFORCE in training needs
  /// `example_losses` ([B], host memory).
  void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses = {}) {
    constexpr const char* op = "smear::layer<cuda>::backward";
    this->check_backward(dy.size(), dx.size(), example_losses, op);
    ctx_->check_pointer(dy.data(), op, "dy");
    ctx_->check_pointer(dx.data(), op, "dx");
    if (this->opt_.check_finite) check_finite(dy.data(), dy.size(), op, "dy");
    this->begin_backward();
    const tokens<const T> x = this->last_;
    const tokens<const T> u = this->units(x, units_);
    const std::size_t B = u.batch, L = u.length, S = u.batch / x.batch;
    const std::int32_t* lens = last_lengths_;
    const T* g = dy.data();
    if (lens != nullptr) {  // padding rows of dy must not reach the parameter gradients
      detail::masked_copy(ctx_->policy(), dy.data(), lens, B, L, this->output_dim(), dy_masked_.data());
      g = dy_masked_.data();
    }
    const auto& p = this->plan_;
    const feedback_needs needs = this->planner_->needs(p, this->was_training_);
    plan_feedback<T> fb = this->feedback(repeat_per_unit(example_losses, S, units_.losses));
    // ∂ℓ/∂W (merge) or the slots' ⟨dy, f⟩ (mixture): the by-router plans' ∂ℓ/∂p
    T* measured = dslots_.data();
    if (p.kind == plan_kind::soft) {
      soft_.backward(*ctx_, soft_moe_of(*this->planner_), kernel_, static_cast<const T*>(bank_values_.data()),
                     bank_grads_.data(), P(), x.data, lens, B, L, this->output_dim(), this->residual_, g, dx.data(), op);
    } else if (p.kind == plan_kind::mixture) {
      backward_mixture(g, dx.data(), lens, B, L, measured);
      if (needs.dcoef) fb.dcoef = download(measured, B, p.slots, dcoef_host_, op);
    } else {
      kernel_.backward(*ctx_, static_cast<const T*>(merged_.data()), P(), x.data, lens, B, L,
                       static_cast<const T*>(saved_.data()), g, dx.data(), gmerged_.data(), scratch_.data());
      detail::finish_rows(ctx_->policy(), dx.data(), static_cast<const T*>(nullptr), 0,
                          this->residual_ ? g : static_cast<const T*>(nullptr), lens, B, L, this->input_dim());
      bank_backward();
      if (p.kind == plan_kind::merge)  // ∂ℓ/∂W = G·Θᵀ
        ctx_->gemm(false, true, B, N, P(), T(1), static_cast<const T*>(gmerged_.data()), P(),
                   static_cast<const T*>(bank_values_.data()), P(), T(0), measured, N);
      if (needs.dweights) fb.dweights = download(measured, B, N, dweights_host_, op);
    }
    if (needs.features) fb.features = download(router_dev_.features(this->router_), B, this->input_dim(), features_host_, op);
    const router_gradient rg = this->planner_->backward(p, fb);
    if (rg == router_gradient::probabilities || rg == router_gradient::logits) {
      const auto grad = this->planner_->gradient();
      T* to = rg == router_gradient::logits ? router_dev_.logit_gradients() : measured;
      ctx_->to_device(to, grad.data, grad.rows * grad.cols, op);
    }
    if (rg != router_gradient::none)
      router_dev_.backward(*ctx_, this->router_, rg == router_gradient::logits ? nullptr : measured, lens, B, L, S,
                           dx.data());
    if (this->opt_.check_finite) {
      check_finite(dx.data(), dx.size(), op, "dx");
      check_finite(bank_grads_.data(), N * P(), op, "expert gradients");
      check_finite(router_dev_.gradients(), router_size(), op, "router gradients");
    }
  }

 private:
  std::size_t P() const noexcept { return this->bank_.parameter_count(); }
  std::size_t router_size() const noexcept { return this->router_.values().size(); }

  matrix_ref<const T> download(const T* from, std::size_t rows, std::size_t cols, std::vector<T>& to, const char* op) {
    to.resize(rows * cols);
    ctx_->to_host(to.data(), from, rows * cols, op);
    return {to.data(), rows, cols};
  }
  void to_device(const std::vector<T>& from, buf<T>& to, const char* op) {
    ctx_->to_device(to.data(), from.data(), from.size(), op);
  }

  /// θ̄ = W·Θ, W the router's p or the plan's weights; with a table, each row merged once into
  /// the cache and the examples' rows gathered from it by a one-hot GEMM.
  void merge(const char* op) {
    const auto& p = this->plan_;
    const std::size_t B = p.batch;
    if (!p.by_router) to_device(p.weights, weights_, op);  // also Wᵀ·G in backward
    const T* W = p.by_router ? router_dev_.probabilities() : weights_.data();
    if (p.table_rows == 0) {
      ctx_->gemm(false, false, B, P(), N, T(1), W, N, static_cast<const T*>(bank_values_.data()), P(), T(0),
                 merged_.data(), P());
      return;
    }
    const std::size_t R = p.table_rows;
    if (!this->cache_valid(cache_version_, cache_table_)) {
      cache_table_ = p.table;
      cache_.reserve(R * P(), "the inference cache of merged experts");
      table_.reserve(R * N, "the inference cache's table");
      to_device(cache_table_, table_, op);
      ctx_->gemm(false, false, R, P(), N, T(1), static_cast<const T*>(table_.data()), N,
                 static_cast<const T*>(bank_values_.data()), P(), T(0), cache_.data(), P());
      cache_version_ = this->version_;
      ++this->cache_builds_;
    }
    onehot_.reserve(B * R, "the one-hot selections of cached rows");
    onehot_host_.assign(B * R, T(0));
    for (std::size_t b = 0; b < B; ++b) onehot_host_[b * R + p.table_row[b]] = T(1);
    to_device(onehot_host_, onehot_, op);
    ctx_->gemm(false, false, B, P(), R, T(1), static_cast<const T*>(onehot_.data()), R,
               static_cast<const T*>(cache_.data()), P(), T(0), merged_.data(), P());
  }

  /// One-hot selections [groups or slots, B, N] of the plan's experts (slots past count[b]: 0).
  void upload_onehot(std::size_t per_example, bool groups, const char* op) {
    const auto& p = this->plan_;
    const std::size_t B = p.batch;
    onehot_host_.assign(per_example * B * N, T(0));
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t j = 0; j < (groups ? per_example : p.count[b]); ++j)
        onehot_host_[(j * B + b) * N + static_cast<std::size_t>(p.expert[b * per_example + j])] = T(1);
    to_device(onehot_host_, onehot_, op);
  }

  /// Parameter group g of example b from expert e_bg: one one-hot GEMM per group.
  void gather(const char* op) {
    const auto& p = this->plan_;
    const std::size_t B = p.batch, G = p.groups.size();
    upload_onehot(G, true, op);
    for (std::size_t g = 0; g < G; ++g)
      ctx_->gemm(false, false, B, p.groups[g].size, N, T(1), static_cast<const T*>(onehot_.data() + g * B * N), N,
                 static_cast<const T*>(bank_values_.data() + p.groups[g].offset), P(), T(0),
                 merged_.data() + p.groups[g].offset, P());
  }

  /// A mixture's forward: slot j of every example runs its expert (the ensemble: expert j for
  /// the whole batch, its parameters shared with stride 0), then y = Σ_j c_j f_j (+ x).
  void run_mixture(tokens<const T> x, const std::int32_t* lens, T* y, const char* op) {
    const auto& p = this->plan_;
    const std::size_t B = x.batch, L = x.length, k = p.slots, out = B * L * this->output_dim(),
                      sv = kernel_.saved_size(B, L);
    if (!p.by_router) {
      upload_onehot(k, false, op);
      coef_host_.assign(B * k, T(0));
      for (std::size_t b = 0; b < B; ++b) std::copy_n(p.coef.data() + b * k, p.count[b], coef_host_.data() + b * k);
      to_device(coef_host_, coef_, op);
    }
    for (std::size_t j = 0; j < k; ++j) {
      const T* theta = slot_parameters(j);
      kernel_.forward(*ctx_, theta, p.by_router ? 0 : P(), x.data, lens, B, L, outputs_.data() + j * out,
                      saved_.data() + j * sv);
    }
    detail::mix_outputs(ctx_->policy(), static_cast<const T*>(outputs_.data()), coefficients(), k,
                        this->residual_ ? x.data : static_cast<const T*>(nullptr), lens, B, L, this->output_dim(), y);
  }
  /// Slot j's parameters: expert j of the bank (by router) or the chosen experts, gathered.
  const T* slot_parameters(std::size_t j) {
    const auto& p = this->plan_;
    if (p.by_router) return bank_values_.data() + j * P();
    const std::size_t B = p.batch;
    ctx_->gemm(false, false, B, P(), N, T(1), static_cast<const T*>(onehot_.data() + j * B * N), N,
               static_cast<const T*>(bank_values_.data()), P(), T(0), merged_.data() + j * B * P(), P());
    return merged_.data() + j * B * P();
  }
  const T* coefficients() const noexcept {
    return this->plan_.by_router ? router_dev_.probabilities() : static_cast<const T*>(coef_.data());
  }

  /// ∂ℓ/∂Θ from G (gmerged_): Wᵀ·G for a merge, the groups' one-hot scatters for a gather.
  void bank_backward() {
    const auto& p = this->plan_;
    const std::size_t B = p.batch;
    const T* gm = gmerged_.data();
    if (p.kind == plan_kind::merge) {
      const T* W = p.by_router ? router_dev_.probabilities() : weights_.data();
      ctx_->gemm(true, false, N, P(), B, T(1), W, N, gm, P(), T(1), bank_grads_.data(), P());
      return;
    }
    for (std::size_t g = 0; g < p.groups.size(); ++g)
      ctx_->gemm(true, false, N, p.groups[g].size, B, T(1), static_cast<const T*>(onehot_.data() + g * B * N), N,
                 gm + p.groups[g].offset, P(), T(1), bank_grads_.data() + p.groups[g].offset, P());
  }

  /// A mixture's backward: per slot, ⟨dy_b, f_j⟩ into `dslot` ([B, k]), the expert's backward
  /// with dy scaled by the coefficient, its share of dx and its parameter gradient (to expert j
  /// for the ensemble, scattered by the one-hot selection otherwise).
  void backward_mixture(const T* g, T* dx, const std::int32_t* lens, std::size_t B, std::size_t L, T* dslot) {
    auto pol = ctx_->policy();
    const auto& p = this->plan_;
    const std::size_t din = this->input_dim(), dout = this->output_dim(), out = B * L * dout,
                      sv = kernel_.saved_size(B, L), row = L * dout, k = p.slots;
    if (this->residual_)
      detail::masked_copy(pol, g, lens, B, L, dout, dx);
    else
      detail::fill(pol, dx, B * L * din, T(0));
    for (std::size_t j = 0; j < k; ++j) {
      ctx_->gemm_batched(false, true, 1, 1, row, T(1), g, row, row, static_cast<const T*>(outputs_.data() + j * out),
                         row, row, T(0), dslot + j, 1, k, B);
      detail::scale_rows(pol, g, coefficients() + j, k, lens, B, L, dout, dye_.data());
      const T* theta = p.by_router ? bank_values_.data() + j * P() : merged_.data() + j * B * P();
      kernel_.backward(*ctx_, theta, p.by_router ? 0 : P(), this->last_.data, lens, B, L,
                       static_cast<const T*>(saved_.data() + j * sv), static_cast<const T*>(dye_.data()), dxe_.data(),
                       gmerged_.data(), scratch_.data());
      detail::finish_rows(pol, dx, static_cast<const T*>(nullptr), 0, static_cast<const T*>(dxe_.data()), lens, B, L,
                          din);
      if (p.by_router)
        ctx_->gemm(false, false, 1, P(), B, T(1), router_dev_.ones(*ctx_, B), B, static_cast<const T*>(gmerged_.data()),
                   P(), T(1), bank_grads_.data() + j * P(), P());
      else
        ctx_->gemm(true, false, N, P(), B, T(1), static_cast<const T*>(onehot_.data() + j * B * N), N,
                   static_cast<const T*>(gmerged_.data()), P(), T(1), bank_grads_.data(), P());
    }
  }

  /// Copies the lengths to the device; null when every example is full (no mask needed).
  const std::int32_t* upload_lengths(tokens<const T> x) {
    bool full = true;
    for (auto l : x.lengths) full = full && static_cast<std::size_t>(l) == x.length;
    if (full) return nullptr;
    if (lengths_.capacity() < x.batch) lengths_host_.clear();  // reallocated: upload again
    lengths_.reserve(x.batch, "the lengths");
    if (!std::equal(x.lengths.begin(), x.lengths.end(), lengths_host_.begin(), lengths_host_.end())) {
      ctx_->to_device(lengths_.data(), x.lengths.data(), x.batch, "smear cuda layer: upload of the lengths");
      lengths_host_.assign(x.lengths.begin(), x.lengths.end());
    }
    return lengths_.data();
  }

  void check_finite(const T* p, std::size_t n, const char* op, const char* what) {
    check_host_.resize(n);
    ctx_->to_host(check_host_.data(), p, n, op);
    smear::detail::check_finite<T>(std::span<const T>(check_host_), op, what);
  }

  /// A soft plan's routing: each expert's mean combine weight, and the most weighted expert.
  void soft_routing() {
    auto& p = this->plan_;
    soft_.expert_shares(*ctx_, soft_moe_of(*this->planner_), last_lengths_, this->last_.lengths, p.batch,
                        this->last_.length, p.weight_matrix(), "smear cuda layer: download of the routing");
    smear::detail::argmax_rows<T>(std::as_const(p).weight_matrix(), p.choices);
    routing_valid_ = true;
  }

  void reserve(std::size_t B, std::size_t L) {
    const auto& p = this->plan_;
    const std::size_t d = this->input_dim(), dout = this->output_dim();
    if (p.kind == plan_kind::soft) {  // device_soft_moe holds the rest
      dy_masked_.reserve(B * L * dout, "the masked output gradient");
      return;
    }
    const std::size_t k = p.kind == plan_kind::mixture ? p.slots : 1;
    merged_.reserve(k * B * P(), "the merged or chosen experts' parameters [k, B, P]");
    gmerged_.reserve(B * P(), "the merged parameters' gradients [B, P]");
    saved_.reserve(k * kernel_.saved_size(B, L), "the experts' saved activations");
    scratch_.reserve(kernel_.scratch_size(B, L), "the experts' scratch");
    dy_masked_.reserve(B * L * dout, "the masked output gradient");
    weights_.reserve(B * N, "the merge weights");
    onehot_.reserve(std::max(k, p.groups.size()) * B * N, "the one-hot selections");
    if (p.kind == plan_kind::mixture) {
      coef_.reserve(B * k, "the slots' coefficients");
      outputs_.reserve(k * B * L * dout, "the slots' outputs [k, B, L, d_out]");
      dye_.reserve(B * L * dout, "the scaled output gradient");
      dxe_.reserve(B * L * d, "the per-slot input gradient");
      router_dev_.ones(*ctx_, B);
    }
    dslots_.reserve(B * std::max(N, k), "the measured ∂ℓ/∂W or slot dot products");
  }

  std::unique_ptr<Ctx> ctx_;
  device_expert<Expert, Ctx> kernel_;
  device_router<T, Ctx> router_dev_;
  device_soft_moe<T, Ctx> soft_;
  buf<T> bank_values_, bank_grads_;
  buf<std::int32_t> lengths_;
  buf<T> merged_, gmerged_, saved_, scratch_, dy_masked_, weights_, onehot_, coef_, outputs_, dye_, dxe_, dslots_,
      cache_, table_;
  const std::int32_t* last_lengths_ = nullptr;
  std::vector<std::int32_t> lengths_host_;  ///< the lengths now on the device
  typename layer_core<Expert, N>::unit_buffers units_;  ///< the batch by routing units (segment routing)
  std::vector<T> logits_host_, probs_host_, routing_host_, onehot_host_, coef_host_, dcoef_host_, dweights_host_,
      features_host_, pooled_host_, check_host_, cache_table_;
  bool routing_valid_ = false;
  std::uint64_t cache_version_ = 0;
};

}  // namespace smear::device
