#pragma once
/// \file backend/cuda/device_layer.hpp
/// The cuda backend's SMEAR block, written once against an execution context: with
/// device::context (cuBLAS + Thrust on a CUDA stream) it is `smear::layer<E, N, backend::cuda>`;
/// with device::host_context the same algorithm runs on a CPU, which the tests compare with the
/// reference backend on machines without a GPU.
///
/// Forward for the whole batch: pool (masked or plain mean), LayerNorm, logits z = F·Wᵀ (one
/// GEMM), softmax with temperature and expert dropout, merge Θ̄ = P·Θ (one GEMM), the experts'
/// strided-batched GEMMs over the padded length, residual and padding mask. Backward: the
/// experts' batched GEMMs give ∂ℓ/∂x and G = ∂ℓ/∂Θ̄; ∂ℓ/∂Θ += Pᵀ·G and ∂ℓ/∂P = G·Θᵀ (two GEMMs);
/// softmax, router GEMMs and LayerNorm backward; the pooled gradient spread over the tokens.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <span>
#include <utility>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/backend/cuda/experts.hpp"
#include "smear/bank.hpp"
#include "smear/concepts.hpp"
#include "smear/error.hpp"
#include "smear/layer.hpp"
#include "smear/random.hpp"
#include "smear/routing/baseline.hpp"
#include "smear/routing/estimators.hpp"
#include "smear/routing/hash.hpp"
#include "smear/routing/latent_skills.hpp"
#include "smear/routing/router.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/tensor.hpp"

namespace smear::device {

/// A SMEAR block of N experts whose parameters, gradients, activations and workspaces live in
/// `Ctx`'s memory. `x`, `y`, `dy` and `dx` passed to forward/backward are in that memory too
/// (device pointers for device::context); `lengths` stay on the host.
///
/// The parameters start exactly as those of `smear::layer<Expert, N>` built with the same
/// prototype, options and seed. bank() and router() are host mirrors: download() refreshes
/// them (values and gradients) from the device, upload() writes their values to the device.
template <class Expert, std::size_t N, class Ctx>
class device_layer {
  static_assert(smear::detail::diagnose_mergeable_expert<Expert>());
  static_assert(N >= 1, "smear::layer: the number of experts N must be at least 1");

 public:
  using expert_type = Expert;
  using value_type = typename Expert::value_type;
  using T = value_type;
  using context_type = Ctx;
  static constexpr std::size_t experts = N;

  /// Builds the block and its context from `ctx_args`. Throws like smear::layer's constructor,
  /// and out_of_memory / cuda_error when the device cannot hold the parameters.
  template <class... CtxArgs>
  explicit device_layer(Expert prototype, layer_options options, std::uint64_t seed,
                        CtxArgs&&... ctx_args)
      : ctx_(std::make_unique<Ctx>(std::forward<CtxArgs>(ctx_args)...)),
        bank_(std::move(prototype)),
        router_(bank_.expert().input_dim(), router_outputs(options.routing), options.router,
                seed ^ 0x5EED0F5EA4ull),
        opt_(options),
        residual_(options.residual.value_or(is_residual_expert<Expert>)),
        gen_(seed),
        kernel_(bank_.expert(), *ctx_) {
    validate(opt_.routing, N);
    if (residual_ && bank_.expert().input_dim() != bank_.expert().output_dim())
      throw value_error(smear::detail::message(
          "layer: residual needs input_dim == output_dim, the expert has ",
          bank_.expert().input_dim(), " -> ", bank_.expert().output_dim()));
    rng init{seed};
    bank_.initialize(init);
    rng extra{seed ^ 0xA11CA7E5ull};  // as smear::layer draws them
    const auto& st = opt_.routing;
    if (st.strategy == strategy::latent_skills)
      skills_.emplace(st.tasks, N, st.skills_temperature, st.skills_init, extra);
    if (st.strategy == strategy::top_k && st.estimator == estimator::reinforce)
      baseline_.emplace(st.baseline, input_dim(), st.baseline_hidden, st.baseline_momentum, extra);
    if (st.strategy == strategy::adamix) groups_ = smear::parameter_groups(bank_.layout());
    const std::size_t np = N * P(), nr = router_.values().size();
    bank_values_.reserve(np, "the expert bank");
    bank_grads_.reserve(np, "the expert bank's gradients");
    router_values_.reserve(nr, "the router's parameters");
    router_grads_.reserve(nr, "the router's gradients");
    upload();
    zero_grad();
    ctx_->synchronize("smear cuda layer: construction");
  }

  const Expert& expert() const noexcept { return bank_.expert(); }
  std::size_t input_dim() const noexcept { return bank_.expert().input_dim(); }
  std::size_t output_dim() const noexcept { return bank_.expert().output_dim(); }
  bool residual() const noexcept { return residual_; }
  const layer_options& options() const noexcept { return opt_; }
  Ctx& context() noexcept { return *ctx_; }

  /// Host mirror of the expert bank (see download() / upload()).
  expert_bank<Expert, N>& bank() noexcept { return bank_; }
  const expert_bank<Expert, N>& bank() const noexcept { return bank_; }
  /// Host mirror of the router (see download() / upload()).
  smear::router<T>& router() noexcept { return router_; }
  const smear::router<T>& router() const noexcept { return router_; }

  /// Whether a learned router decides the routing (smear, ensemble, top-k; unused otherwise).
  bool uses_router() const noexcept {
    const auto st = opt_.routing.strategy;
    return st == strategy::smear || st == strategy::ensemble || st == strategy::top_k;
  }
  /// REINFORCE's baseline (host memory); throws state_error under another estimator.
  reinforce_baseline<T>& baseline() {
    if (!baseline_) throw state_error("layer<cuda>::baseline: the estimator is not reinforce");
    return *baseline_;
  }
  const strategy_options& strategy() const noexcept { return opt_.routing; }
  /// The latent-skill allocation (host memory: it is small and read per example); throws
  /// state_error under another strategy.
  latent_skills<T>& skills() {
    if (!skills_) throw state_error("layer<cuda>::skills: the strategy is not latent_skills");
    return *skills_;
  }

  /// The parameters and gradients in the context's memory: bank [N, P], router (its layout()).
  matrix_ref<T> device_bank_values() noexcept { return {bank_values_.data(), N, P()}; }
  matrix_ref<T> device_bank_gradients() noexcept { return {bank_grads_.data(), N, P()}; }
  std::span<T> device_router_values() noexcept { return {router_values_.data(), router_.values().size()}; }
  std::span<T> device_router_gradients() noexcept {
    return {router_grads_.data(), router_.values().size()};
  }

  /// Writes the host mirrors' parameter values to the device (asynchronously on the stream).
  void upload() {
    ctx_->to_device(bank_values_.data(), static_cast<const T*>(bank_.values().data), N * P(),
                    "smear cuda layer: upload of the expert bank");
    ctx_->to_device(router_values_.data(), router_.values().data(), router_.values().size(),
                    "smear cuda layer: upload of the router");
  }

  /// Refreshes the host mirrors' values and gradients from the device; waits for the stream.
  void download() {
    const char* op = "smear cuda layer: download of the parameters";
    ctx_->to_host(bank_.values().data, static_cast<const T*>(bank_values_.data()), N * P(), op);
    ctx_->to_host(bank_.gradients().data, static_cast<const T*>(bank_grads_.data()), N * P(), op);
    ctx_->to_host(router_.values().data(), static_cast<const T*>(router_values_.data()),
                  router_.values().size(), op);
    ctx_->to_host(router_.gradients().data(), static_cast<const T*>(router_grads_.data()),
                  router_.values().size(), op);
  }

  void reseed(std::uint64_t seed) noexcept { gen_ = rng{seed}; }
  void train(bool on = true) noexcept { training_ = on; }
  bool training() const noexcept { return training_; }

  /// Sets every gradient on the device to zero.
  void zero_grad() {
    if (skills_) skills_->zero_grad();
    detail::fill(ctx_->policy(), bank_grads_.data(), N * P(), T(0));
    detail::fill(ctx_->policy(), router_grads_.data(), router_.values().size(), T(0));
  }

  /// The routing distribution of the last forward, [B, N], in the context's memory.
  matrix_ref<const T> device_routing() const noexcept { return {used_.data(), batch_, N}; }
  /// The same copied to the host (waits for the stream).
  matrix_ref<const T> routing() {
    if (last_dselect_) return {weights_host_.data(), batch_, N};
    routing_host_.resize(batch_ * N);
    ctx_->to_host(routing_host_.data(), static_cast<const T*>(used_.data()), batch_ * N,
                  "smear cuda layer: download of the routing");
    return {routing_host_.data(), batch_, N};
  }

  /// Bytes of the per-call buffers held in the context's memory.
  std::size_t workspace_bytes() const noexcept {
    return sizeof(T) * (pooled_.capacity() + normed_.capacity() + features_.capacity() +
                        rstd_.capacity() + logits_.capacity() + soft_.capacity() + used_.capacity() +
                        keep_.capacity() + kept_.capacity() + dlogits_.capacity() +
                        dfeatures_.capacity() + merged_.capacity() + gmerged_.capacity() +
                        dprobs_.capacity() + saved_.capacity() + scratch_.capacity() +
                        dy_masked_.capacity() + ln_stats_.capacity() + ln_tmp_.capacity() +
                        ln_tmp2_.capacity() + ones_.capacity() + onehot_.capacity() +
                        outputs_.capacity() + dye_.capacity() + dxe_.capacity()) +
           sizeof(std::int32_t) * lengths_.capacity();
  }

  /// y ← block(x), enqueued on the context's stream. x [B, L, input_dim] and y (B·L·output_dim
  /// values) are in the context's memory, x.lengths on the host. Padding rows of x must be
  /// finite; padding rows of y are written as zero. Throws shape_error / value_error before any
  /// work on a bad shape or a host pointer, numeric_error in checked mode.
  void forward(tokens<const T> x, std::span<T> y, route_inputs in = {}) {
    constexpr const char* op = "smear::layer<cuda>::forward";
    check_input(x, op);
    const auto st = opt_.routing.strategy;
    const bool ensemble = st == strategy::ensemble;
    const bool topk = st == strategy::top_k;
    const bool routed = st == strategy::smear || ensemble || topk;
    if (y.size() != x.batch * x.length * output_dim())
      throw shape_error(smear::detail::message(op, ": y has ", y.size(),
                                               " values, expected [B, L, d_out] = ",
                                               smear::detail::shape(x.batch, x.length, output_dim())));
    ctx_->check_pointer(x.data, op, "x");
    ctx_->check_pointer(y.data(), op, "y");
    if (st == strategy::tag || st == strategy::hash) route_fixed(x, in, op);
    if (st == strategy::latent_skills) route_skills(x, in, op);
    const bool gather = st == strategy::adamix && training_;
    if (st == strategy::adamix) route_adamix(x.batch, gather);
    pending_backward_ = false;
    if (opt_.check_finite) check_finite(x.data, x.size(), op, "x");
    const std::size_t B = x.batch, L = x.length;
    reserve(B, L);
    choices_valid_ = !routed;
    choice_cols_ = 1;
    const std::int32_t* lens = upload_lengths(x);

    aux_ = T(0);
    if (routed) route(x, lens, op, !topk);
    else ctx_->to_device(used_.data(), static_cast<const T*>(weights_host_.data()), B * N, op);
    if (gather) {
      // AdaMix in training: parameter group g of example b from expert e_bg, as one one-hot
      // GEMM per group over the group's columns
      const std::size_t G = groups_.size();
      ctx_->to_device(onehot_.data(), static_cast<const T*>(onehot_host_.data()), G * B * N, op);
      for (std::size_t g = 0; g < G; ++g)
        ctx_->gemm(false, false, B, groups_[g].size, N, T(1), static_cast<const T*>(onehot_.data() + g * B * N),
                   N, static_cast<const T*>(bank_values_.data() + groups_[g].offset), P(), T(0),
                   merged_.data() + groups_[g].offset, P());
    } else if (topk) {
      select_top_k(B, op);
    } else if (!ensemble) {
      // merge: Θ̄ = P·Θ
      ctx_->gemm(false, false, B, P(), N, T(1), static_cast<const T*>(used_.data()), N,
                 static_cast<const T*>(bank_values_.data()), P(), T(0), merged_.data(), P());
    }
    if (topk) {
      // slot j of every example runs its chosen expert: parameters gathered by a one-hot GEMM
      const std::size_t k = slots_, out = B * L * output_dim(), sv = kernel_.saved_size(B, L);
      for (std::size_t j = 0; j < k; ++j) {
        ctx_->gemm(false, false, B, P(), N, T(1), static_cast<const T*>(onehot_.data() + j * B * N), N,
                   static_cast<const T*>(bank_values_.data()), P(), T(0), merged_.data() + j * B * P(), P());
        kernel_.forward(*ctx_, static_cast<const T*>(merged_.data() + j * B * P()), P(), x.data, lens, B, L,
                        outputs_.data() + j * out, saved_.data() + j * sv);
      }
      detail::mix_outputs(ctx_->policy(), static_cast<const T*>(outputs_.data()),
                          static_cast<const T*>(coef_.data()), k,
                          residual_ ? x.data : static_cast<const T*>(nullptr), lens, B, L, output_dim(),
                          y.data());
    } else if (ensemble) {
      // every expert on the whole batch (its parameters shared: stride 0), then y = Σ_e p_e f_e
      const std::size_t out = B * L * output_dim(), sv = kernel_.saved_size(B, L);
      for (std::size_t e = 0; e < N; ++e)
        kernel_.forward(*ctx_, static_cast<const T*>(bank_values_.data() + e * P()), 0, x.data, lens, B, L,
                        outputs_.data() + e * out, saved_.data() + e * sv);
      detail::mix_outputs(ctx_->policy(), static_cast<const T*>(outputs_.data()),
                          static_cast<const T*>(used_.data()), N,
                          residual_ ? x.data : static_cast<const T*>(nullptr), lens, B, L, output_dim(),
                          y.data());
    } else {
      // apply
      kernel_.forward(*ctx_, static_cast<const T*>(merged_.data()), P(), x.data, lens, B, L, y.data(),
                      saved_.data());
      detail::finish_rows(ctx_->policy(), y.data(), static_cast<const T*>(nullptr), 0,
                          residual_ ? x.data : static_cast<const T*>(nullptr), lens, B, L, output_dim());
    }
    if (opt_.check_finite) check_finite(y.data(), y.size(), op, "y");
    last_ = x;
    last_lengths_ = lens;
    last_routed_ = routed;
    last_gather_ = gather;
    last_ensemble_ = ensemble;
    last_topk_ = topk;
    last_dselect_ = topk && opt_.routing.estimator == estimator::dselect;
    was_training_ = training_;
    pending_backward_ = true;
  }

  /// The experts each example of the last forward ran, [B, 1] on the host: the most probable
  /// one for smear (waits for the stream), the chosen one for tag and hash routing.
  matrix_ref<const std::int32_t> choices() {
    if (!choices_valid_) {
      routing();
      choices_host_.resize(batch_);
      for (std::size_t b = 0; b < batch_; ++b) {
        const T* w = routing_host_.data() + b * N;
        choices_host_[b] = static_cast<std::int32_t>(std::max_element(w, w + N) - w);
      }
      choices_valid_ = true;
    }
    return {choices_host_.data(), batch_, choice_cols_};
  }

  /// The regulariser backward() differentiates along with the caller's loss, as a batch mean:
  /// REINFORCE's −bonus·H(p); 0 for the other strategies here.
  T auxiliary_loss() const noexcept { return aux_; }

  /// Given dy for the last forward (in the context's memory), overwrites dx with ∂ℓ/∂x and adds
  /// the parameters' gradients on the device. Padding rows of dy are ignored; those of dx are
  /// written as zero. Must follow a forward, once. `example_losses` ([B] or empty) is accepted
  /// for the layer interface's sake; the strategies the cuda backend runs do not need it.
  void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses = {}) {
    constexpr const char* op = "smear::layer<cuda>::backward";
    if (!pending_backward_)
      throw state_error(smear::detail::message(op, ": no forward to go back through (backward runs "
                                                   "once per forward)"));
    const tokens<const T> x = last_;
    if (!example_losses.empty() && example_losses.size() != x.batch)
      throw shape_error(smear::detail::message(op, ": example_losses has ", example_losses.size(),
                                               " values, expected B = ", x.batch));
    if (dy.size() != x.batch * x.length * output_dim())
      throw shape_error(smear::detail::message(op, ": dy has ", dy.size(),
                                               " values, expected [B, L, d_out] = ",
                                               smear::detail::shape(x.batch, x.length, output_dim())));
    if (dx.size() != x.size())
      throw shape_error(smear::detail::message(op, ": dx has ", dx.size(),
                                               " values, expected [B, L, d_in] = ",
                                               smear::detail::shape(x.batch, x.length, input_dim())));
    ctx_->check_pointer(dy.data(), op, "dy");
    ctx_->check_pointer(dx.data(), op, "dx");
    const bool reinforce = last_topk_ && opt_.routing.estimator == estimator::reinforce && was_training_;
    if (reinforce && example_losses.empty())
      throw value_error(smear::detail::message(op, ": REINFORCE needs each example's loss: call "
                                                   "backward(dy, dx, losses) with B = ", x.batch, " losses"));
    if (opt_.check_finite) check_finite(dy.data(), dy.size(), op, "dy");
    pending_backward_ = false;
    const std::size_t B = x.batch, L = x.length, d = input_dim(), dout = output_dim();
    const std::int32_t* lens = last_lengths_;
    auto pol = ctx_->policy();

    const T* g = dy.data();
    if (lens != nullptr) {  // padding rows of dy must not reach the parameter gradients
      detail::masked_copy(pol, dy.data(), lens, B, L, dout, dy_masked_.data());
      g = dy_masked_.data();
    }
    if (last_ensemble_ || last_topk_) {
      if (last_ensemble_) {
        backward_ensemble(g, dx.data(), lens, B, L);
        backward_router(lens, B, L, dx.data(), false);
      } else {
        backward_top_k(g, dx.data(), lens, B, L, example_losses, op);
      }
      if (opt_.check_finite) {
        check_finite(dx.data(), dx.size(), op, "dx");
        check_finite(bank_grads_.data(), N * P(), op, "expert gradients");
        check_finite(router_grads_.data(), router_.values().size(), op, "router gradients");
      }
      return;
    }
    kernel_.backward(*ctx_, static_cast<const T*>(merged_.data()), P(), x.data, lens, B, L,
                     static_cast<const T*>(saved_.data()), g, dx.data(), gmerged_.data(),
                     scratch_.data());
    detail::finish_rows(pol, dx.data(), static_cast<const T*>(nullptr), 0,
                        residual_ ? g : static_cast<const T*>(nullptr), lens, B, L, d);
    // ∂ℓ/∂Θ += Pᵀ·G ; ∂ℓ/∂P = G·Θᵀ
    const T* gm = gmerged_.data();
    if (last_gather_) {
      for (std::size_t gi = 0; gi < groups_.size(); ++gi)
        ctx_->gemm(true, false, N, groups_[gi].size, B, T(1),
                   static_cast<const T*>(onehot_.data() + gi * B * N), N, gm + groups_[gi].offset, P(), T(1),
                   bank_grads_.data() + groups_[gi].offset, P());
    } else {
      ctx_->gemm(true, false, N, P(), B, T(1), static_cast<const T*>(used_.data()), N, gm, P(), T(1),
                 bank_grads_.data(), P());
    }
    if (last_routed_) backward_router(lens, B, L, dx.data(), true);
    if (skills_) {  // ∂ℓ/∂w = G·Θᵀ, then the allocation's gradient on the host
      ctx_->gemm(false, true, B, N, P(), T(1), gm, P(), static_cast<const T*>(bank_values_.data()), P(),
                 T(0), dprobs_.data(), N);
      dw_host_.resize(B * N);
      ctx_->to_host(dw_host_.data(), static_cast<const T*>(dprobs_.data()), B * N, op);
      for (std::size_t b = 0; b < B; ++b)
        skills_->backward(static_cast<std::size_t>(tags_host_[b]), was_training_,
                          {soft_host_.data() + b * N, N}, {weights_host_.data() + b * N, N},
                          {dw_host_.data() + b * N, N});
    }
    if (opt_.check_finite) {
      check_finite(dx.data(), dx.size(), op, "dx");
      check_finite(bank_grads_.data(), N * P(), op, "expert gradients");
      check_finite(router_grads_.data(), router_.values().size(), op, "router gradients");
    }
  }

 private:
  /// The router's forward: pool, LayerNorm, logits, softmax with dropout into used_.
  void route(tokens<const T> x, const std::int32_t* lens, const char* op, bool dropout) {
    const std::size_t B = x.batch, L = x.length, d = input_dim();
    auto pol = ctx_->policy();
    const bool all_rows = router_.options().pool == pooling::mean;
    const std::size_t R = router_.outputs();
    // keep mask of expert dropout, drawn on the host in the reference backend's order
    const bool drop = dropout && training_ && router_.options().expert_dropout > 0.0;
    if (drop || keep_ones_ < B * R) {  // an all-ones mask already on the device is reused
      keep_host_.assign(B * R, T(1));
      if (drop)
        for (auto& k : keep_host_) k = gen_.uniform() >= router_.options().expert_dropout ? T(1) : T(0);
      ctx_->to_device(keep_.data(), static_cast<const T*>(keep_host_.data()), B * R, op);
      keep_ones_ = drop ? 0 : B * R;
    }

    // router
    detail::pool(pol, x.data, lens, B, L, d, all_rows, pooled_.data());
    const T* rv = router_values_.data();
    const T* features = pooled_.data();
    if (router_.options().layer_norm) {
      // row means and variances as GEMMs with a ones vector, the rest element-wise
      T* mean = ln_stats_.data();
      T* var = ln_stats_.data() + B;
      const T inv_d = T(1) / static_cast<T>(d);
      ctx_->gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(pooled_.data()), d,
                 static_cast<const T*>(ones_.data()), 1, T(0), mean, 1);
      detail::center_rows(pol, static_cast<const T*>(pooled_.data()), static_cast<const T*>(mean), B, d,
                          ln_tmp_.data(), ln_tmp2_.data());
      ctx_->gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(ln_tmp2_.data()), d,
                 static_cast<const T*>(ones_.data()), 1, T(0), var, 1);
      detail::normalize_rows(pol, static_cast<const T*>(ln_tmp_.data()), static_cast<const T*>(var), rv,
                             rv + d, B, d, static_cast<T>(router_.options().layer_norm_eps),
                             normed_.data(), features_.data(), rstd_.data());
      features = features_.data();
    }
    ctx_->gemm(false, true, B, R, d, T(1), features, d, rv + weight_offset(), d, T(0), logits_.data(), R);
    detail::softmax_dropout(pol, logits_.data(), rv + weight_offset() + R * d, keep_.data(), B, R,
                            inv_temperature(), soft_.data(), used_.data(), kept_.data());
  }

  /// ∂ℓ/∂P = G·Θᵀ, then softmax, router GEMMs, LayerNorm and the spread into dx (unless detached).
  /// (With `from_merged` false, dprobs_ already holds ∂ℓ/∂P.)
  /// (With `through_softmax` false, dlogits_ already holds ∂ℓ/∂z.)
  void backward_router(const std::int32_t* lens, std::size_t B, std::size_t L, T* dxp, bool from_merged,
                       bool through_softmax = true) {
    const std::size_t d = input_dim(), R = router_.outputs();
    auto pol = ctx_->policy();
    if (from_merged)
      ctx_->gemm(false, true, B, N, P(), T(1), static_cast<const T*>(gmerged_.data()), P(),
                 static_cast<const T*>(bank_values_.data()), P(), T(0), dprobs_.data(), N);
    // router
    if (through_softmax)
      detail::softmax_dropout_backward(pol, static_cast<const T*>(dprobs_.data()),
                                     static_cast<const T*>(soft_.data()),
                                     static_cast<const T*>(used_.data()),
                                     static_cast<const T*>(keep_.data()),
                                     static_cast<const T*>(kept_.data()), B, N, inv_temperature(),
                                     dlogits_.data());
    const T* rv = router_values_.data();
    T* rg = router_grads_.data();
    const bool ln = router_.options().layer_norm;
    const T* features = ln ? features_.data() : pooled_.data();
    const T* dz = dlogits_.data();
    ctx_->gemm(true, false, R, d, B, T(1), dz, R, features, d, T(1), rg + weight_offset(), d);
    detail::add_column_sums(pol, dz, static_cast<const T*>(nullptr), B, R, rg + weight_offset() + R * d);
    ctx_->gemm(false, false, B, d, R, T(1), dz, R, rv + weight_offset(), d, T(0), dfeatures_.data(), d);
    if (ln) {
      // dgain += Σ_b df ⊙ normed, dshift += Σ_b df; then ∂ℓ/∂h with the row means as GEMMs
      const T* nrm = normed_.data();
      T* df = dfeatures_.data();
      detail::add_column_sums(pol, static_cast<const T*>(df), nrm, B, d, rg);
      detail::add_column_sums(pol, static_cast<const T*>(df), static_cast<const T*>(nullptr), B, d, rg + d);
      detail::layer_norm_grad_prepare(pol, df, rv, nrm, B, d, ln_tmp_.data());
      T* mean_dn = ln_stats_.data();
      T* mean_dn_n = ln_stats_.data() + B;
      const T inv_d = T(1) / static_cast<T>(d);
      const T* ones = ones_.data();
      ctx_->gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(df), d, ones, 1, T(0), mean_dn, 1);
      ctx_->gemm(false, false, B, 1, d, inv_d, static_cast<const T*>(ln_tmp_.data()), d, ones, 1, T(0),
                 mean_dn_n, 1);
      detail::layer_norm_grad_finish(pol, df, nrm, static_cast<const T*>(rstd_.data()),
                                     static_cast<const T*>(mean_dn), static_cast<const T*>(mean_dn_n), B, d);
    }
    if (!router_.options().detach_input)
      detail::spread_pooled(pol, static_cast<const T*>(dfeatures_.data()), lens, B, L, d,
                            router_.options().pool == pooling::mean, dxp);
  }

  /// Ensemble backward: expert e's backward with dy scaled by p_e gives its share of ∂ℓ/∂x
  /// and, summed over the batch, ∂ℓ/∂θ_e; ∂ℓ/∂p_be = ⟨dy_b, f_e(x_b)⟩ (one batched GEMM of
  /// 1×1 results) goes to dprobs_ for the router.
  void backward_ensemble(const T* g, T* dx, const std::int32_t* lens, std::size_t B, std::size_t L) {
    auto pol = ctx_->policy();
    const std::size_t din = input_dim(), dout = output_dim(), out = B * L * dout,
                      sv = kernel_.saved_size(B, L), row = L * dout;
    if (residual_)
      detail::masked_copy(pol, g, lens, B, L, dout, dx);
    else
      detail::fill(pol, dx, B * L * din, T(0));
    for (std::size_t e = 0; e < N; ++e) {
      const T* oute = outputs_.data() + e * out;
      ctx_->gemm_batched(false, true, 1, 1, row, T(1), g, row, row, oute, row, row, T(0), dprobs_.data() + e, 1,
                         N, B);
      detail::scale_rows(pol, g, static_cast<const T*>(used_.data()) + e, N, lens, B, L, dout, dye_.data());
      kernel_.backward(*ctx_, static_cast<const T*>(bank_values_.data() + e * P()), 0, last_.data, lens, B, L,
                       static_cast<const T*>(saved_.data() + e * sv), static_cast<const T*>(dye_.data()),
                       dxe_.data(), gmerged_.data(), scratch_.data());
      detail::finish_rows(pol, dx, static_cast<const T*>(nullptr), 0, static_cast<const T*>(dxe_.data()), lens,
                          B, L, din);
      ctx_->gemm(false, false, 1, P(), B, T(1), static_cast<const T*>(ones_.data()), B,
                 static_cast<const T*>(gmerged_.data()), P(), T(1), bank_grads_.data() + e * P(), P());
    }
  }

  /// Top-k routing on the host from the router's logits and probabilities (copied back; B·N
  /// values): ST-Gumbel's relaxed sample and its top k, or REINFORCE's sample, exactly as
  /// smear::layer draws them; then the slots' one-hot selections and coefficients go up.
  void select_top_k(std::size_t B, const char* op) {
    const auto& o = opt_.routing;
    if (o.estimator == estimator::dselect) {
      select_dselect(B, op);
      return;
    }
    const std::size_t k = slots_ = choice_cols_ = o.estimator == estimator::st_gumbel ? o.k : 1;
    z_host_.resize(B * N);
    routing_host_.resize(B * N);
    ctx_->to_host(z_host_.data(), static_cast<const T*>(logits_.data()), B * N, op);
    ctx_->to_host(routing_host_.data(), static_cast<const T*>(used_.data()), B * N, op);
    const T inv_t = inv_temperature();
    soft_host_.resize(B * N);
    choices_host_.assign(B * k, 0);
    coef_host_.assign(B * k, T(1) / static_cast<T>(k));
    onehot_host_.assign(k * B * N, T(0));
    for (std::size_t b = 0; b < B; ++b) {
      const T* w = routing_host_.data() + b * N;
      const T* z = z_host_.data() + b * N;
      std::int32_t* sel = choices_host_.data() + b * k;
      if (o.estimator == estimator::st_gumbel) {
        std::span<T> soft{soft_host_.data() + b * N, N};
        estimate::gumbel_softmax<T>({z, N}, inv_t, training_, gen_, soft);
        estimate::top_k<T>(soft, {sel, k});
      } else {  // REINFORCE: e ~ p in training, argmax at inference
        sel[0] = static_cast<std::int32_t>(estimate::sample_or_argmax<T>({w, N}, training_, gen_));
        if (o.entropy_bonus > 0.0)
          aux_ -= static_cast<T>(o.entropy_bonus) * estimate::entropy<T>({w, N}) / static_cast<T>(B);
      }
      for (std::size_t j = 0; j < k; ++j) onehot_host_[(j * B + b) * N + static_cast<std::size_t>(sel[j])] = T(1);
    }
    ctx_->to_device(onehot_.data(), static_cast<const T*>(onehot_host_.data()), k * B * N, op);
    ctx_->to_device(coef_.data(), static_cast<const T*>(coef_host_.data()), B * k, op);
    choices_valid_ = true;
  }

  /// DSelect-k (k = 1): ⌈log₂ N⌉ smooth-step gates of the router's logits weight the experts'
  /// binary codes, as smear::layer computes them. Training runs every expert with a nonzero code
  /// weight (slot e = expert e, coefficient r_e), inference the best one.
  void select_dselect(std::size_t B, const char* op) {
    const auto& o = opt_.routing;
    const std::size_t K = router_.outputs(), codes = std::size_t{1} << K;
    const std::size_t k = slots_ = training_ ? N : 1;
    choice_cols_ = 1;
    z_host_.resize(B * K);
    ctx_->to_host(z_host_.data(), static_cast<const T*>(logits_.data()), B * K, op);
    gates_host_.resize(B * K);
    r_host_.resize(B * codes);
    weights_host_.resize(B * N);
    choices_host_.assign(B, 0);
    coef_host_.assign(B * k, T(0));
    onehot_host_.assign(k * B * N, T(0));
    for (std::size_t b = 0; b < B; ++b) {
      T* r = r_host_.data() + b * codes;
      T* w = weights_host_.data() + b * N;
      const auto picked = dselect::select<T>({z_host_.data() + b * K, K}, o.dselect_gamma,
                                             {gates_host_.data() + b * K, K}, {r, codes}, {w, N});
      const auto best = static_cast<std::size_t>(std::max_element(w, w + N) - w);
      choices_host_[b] = static_cast<std::int32_t>(best);
      if (training_) {
        for (std::size_t e = 0; e < N; ++e) {
          onehot_host_[(e * B + b) * N + e] = T(1);
          coef_host_[b * k + e] = r[e] > T(0) ? r[e] : T(0);
        }
      } else {
        onehot_host_[b * N + best] = T(1);
        coef_host_[b] = T(1);
      }
      aux_ += (static_cast<T>(o.dselect_entropy) * picked.entropy +
               static_cast<T>(o.dselect_unused_penalty) * picked.unused) /
              static_cast<T>(B);
    }
    ctx_->to_device(onehot_.data(), static_cast<const T*>(onehot_host_.data()), k * B * N, op);
    ctx_->to_device(coef_.data(), static_cast<const T*>(coef_host_.data()), B * k, op);
    choices_valid_ = true;
  }

  /// Top-k backward: each slot's expert backward with dy scaled by its coefficient, its
  /// parameter gradient scattered to the chosen expert (a one-hot GEMM), ∂ℓ/∂coefficient as
  /// ⟨dy_b, f⟩; then the estimator's ∂ℓ/∂z on the host and the router's backward from the logits.
  void backward_top_k(const T* g, T* dx, const std::int32_t* lens, std::size_t B, std::size_t L,
                      std::span<const T> losses, const char* op) {
    auto pol = ctx_->policy();
    const auto& o = opt_.routing;
    const std::size_t din = input_dim(), dout = output_dim(), out = B * L * dout,
                      sv = kernel_.saved_size(B, L), row = L * dout, k = slots_;
    if (residual_)
      detail::masked_copy(pol, g, lens, B, L, dout, dx);
    else
      detail::fill(pol, dx, B * L * din, T(0));
    for (std::size_t j = 0; j < k; ++j) {
      ctx_->gemm_batched(false, true, 1, 1, row, T(1), g, row, row, static_cast<const T*>(outputs_.data() + j * out),
                         row, row, T(0), dprobs_.data() + j, 1, k, B);
      detail::scale_rows(pol, g, static_cast<const T*>(coef_.data()) + j, k, lens, B, L, dout, dye_.data());
      kernel_.backward(*ctx_, static_cast<const T*>(merged_.data() + j * B * P()), P(), last_.data, lens, B, L,
                       static_cast<const T*>(saved_.data() + j * sv), static_cast<const T*>(dye_.data()),
                       dxe_.data(), gmerged_.data(), scratch_.data());
      detail::finish_rows(pol, dx, static_cast<const T*>(nullptr), 0, static_cast<const T*>(dxe_.data()), lens,
                          B, L, din);
      ctx_->gemm(true, false, N, P(), B, T(1), static_cast<const T*>(onehot_.data() + j * B * N), N,
                 static_cast<const T*>(gmerged_.data()), P(), T(1), bank_grads_.data(), P());
    }
    // ∂ℓ/∂z on the host (B·N values)
    const T inv_t = inv_temperature();
    const T inv_b = T(1) / static_cast<T>(B);
    dcoef_host_.resize(B * k);
    ctx_->to_host(dcoef_host_.data(), static_cast<const T*>(dprobs_.data()), B * k, op);
    dw_host_.assign(B * N, T(0));
    if (o.estimator == estimator::dselect) {
      if (!was_training_) return;  // one expert with coefficient 1: no gradient to the gates
      const std::size_t K = router_.outputs(), codes = std::size_t{1} << K;
      std::vector<T>& dr = dr_host_;
      dr.resize(codes);
      dw_host_.assign(B * K, T(0));
      for (std::size_t b = 0; b < B; ++b) {
        const T* r = r_host_.data() + b * codes;
        std::fill(dr.begin(), dr.end(), T(0));
        for (std::size_t e = 0; e < N; ++e)
          if (r[e] > T(0)) dr[e] = dcoef_host_[b * k + e];
        dselect::select_backward<T>({z_host_.data() + b * K, K}, o.dselect_gamma, {gates_host_.data() + b * K, K},
                                    {r, codes}, N, static_cast<T>(o.dselect_entropy) * inv_b,
                                    static_cast<T>(o.dselect_unused_penalty) * inv_b, dr,
                                    {dw_host_.data() + b * K, K});
      }
      ctx_->to_device(dlogits_.data(), static_cast<const T*>(dw_host_.data()), B * K, op);
      backward_router(lens, B, L, dx, false, false);
      return;
    }
    if (o.estimator == estimator::st_gumbel) {
      for (std::size_t b = 0; b < B; ++b) {
        const T* soft = soft_host_.data() + b * N;
        T* d = dw_host_.data() + b * N;
        for (std::size_t j = 0; j < k; ++j)
          d[choices_host_[b * k + j]] = dcoef_host_[b * k + j] / static_cast<T>(k);
        estimate::softmax_backward<T>({soft, N}, {d, N}, inv_t);
      }
    } else {
      if (!was_training_) return;  // argmax routing: nothing to estimate
      const bool ln = router_.options().layer_norm;
      const std::size_t d = input_dim();
      features_host_.resize(B * d);
      ctx_->to_host(features_host_.data(), static_cast<const T*>(ln ? features_.data() : pooled_.data()), B * d, op);
      const matrix_ref<const T> feats{features_host_.data(), B, d};
      base_host_.resize(B);
      baseline_->predict(feats, losses, base_host_);
      for (std::size_t b = 0; b < B; ++b)
        estimate::reinforce_gradient<T>({routing_host_.data() + b * N, N}, static_cast<std::size_t>(choices_host_[b]),
                                        (losses[b] - base_host_[b]) * inv_b, static_cast<T>(o.entropy_bonus) * inv_b,
                                        inv_t, {dw_host_.data() + b * N, N});
      baseline_->update(feats, losses, base_host_);
    }
    ctx_->to_device(dlogits_.data(), static_cast<const T*>(dw_host_.data()), B * N, op);
    backward_router(lens, B, L, dx, false, false);
  }

  /// The router's outputs: ⌈log₂ N⌉ gate logits for DSelect-k, N logits otherwise.
  static std::size_t router_outputs(const strategy_options& o) {
    return o.strategy == strategy::top_k && o.estimator == estimator::dselect ? ceil_log2(N) : N;
  }

  /// AdaMix: in training an independent random expert per parameter group of each example
  /// (drawn in smear::layer's order), at inference the plain average.
  void route_adamix(std::size_t B, bool gather) {
    const std::size_t G = groups_.size();
    weights_host_.assign(B * N, gather ? T(0) : T(1) / static_cast<T>(N));
    choices_host_.assign(B, 0);
    if (!gather) return;
    onehot_host_.assign(G * B * N, T(0));
    const T share = T(1) / static_cast<T>(G);
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t g = 0; g < G; ++g) {
        const auto e = static_cast<std::size_t>(gen_.below(N));
        onehot_host_[(g * B + b) * N + e] = T(1);
        weights_host_[b * N + e] += share;
        if (g == 0) choices_host_[b] = static_cast<std::int32_t>(e);
      }
  }

  /// Latent skills: each example merged by its task's allocation (relaxed Bernoulli samples in
  /// training, σ(logits) at inference), computed on the host.
  void route_skills(tokens<const T> x, const route_inputs& in, const char* op) {
    const std::size_t B = x.batch, tasks = skills_->tasks();
    if (in.tags.size() != B)
      throw shape_error(smear::detail::message(op, ": latent_skills routing needs one tag per example, got ",
                                               in.tags.size(), " tags for B = ", B));
    for (std::size_t b = 0; b < B; ++b)
      if (in.tags[b] < 0 || static_cast<std::size_t>(in.tags[b]) >= tasks)
        throw value_error(smear::detail::message(op, ": example ", b, " has tag ", in.tags[b],
                                                 ", expected 0..", tasks - 1, " (one row per task)"));
    tags_host_.assign(in.tags.begin(), in.tags.end());
    weights_host_.resize(B * N);
    soft_host_.resize(B * N);
    choices_host_.resize(B);
    for (std::size_t b = 0; b < B; ++b) {
      std::span<T> w{weights_host_.data() + b * N, N};
      skills_->weights(static_cast<std::size_t>(in.tags[b]), training_, gen_, {soft_host_.data() + b * N, N}, w);
      choices_host_[b] = static_cast<std::int32_t>(std::max_element(w.begin(), w.end()) - w.begin());
    }
  }

  /// Tag or hash routing: one-hot weights and choices on the host, as the reference layer
  /// computes them. Checks `in` first.
  void route_fixed(tokens<const T> x, const route_inputs& in, const char* op) {
    const std::size_t B = x.batch;
    const auto s = opt_.routing.strategy;
    if (s == strategy::tag) {
      if (in.tags.size() != B)
        throw shape_error(smear::detail::message(op, ": tag routing needs one tag per example, got ",
                                                 in.tags.size(), " tags for B = ", B));
      for (std::size_t b = 0; b < B; ++b)
        if (in.tags[b] < 0 || static_cast<std::size_t>(in.tags[b]) >= N)
          throw value_error(smear::detail::message(op, ": example ", b, " has tag ", in.tags[b],
                                                   ", expected 0..", N - 1, " (one expert per tag)"));
    } else {
      if (!in.token_ids.empty() && in.token_ids.size() != B * x.length)
        throw shape_error(smear::detail::message(op, ": token_ids has ", in.token_ids.size(),
                                                 " values, expected [B, L] = ",
                                                 smear::detail::shape(B, x.length)));
      if (in.token_ids.empty() && !in.example_ids.empty() && in.example_ids.size() != B)
        throw shape_error(smear::detail::message(op, ": example_ids has ", in.example_ids.size(),
                                                 " values, expected B = ", B));
    }
    weights_host_.assign(B * N, T(0));
    choices_host_.resize(B);
    for (std::size_t b = 0; b < B; ++b) {
      std::size_t e;
      if (s == strategy::tag) {
        e = static_cast<std::size_t>(in.tags[b]);
      } else {
        const std::uint64_t seed = opt_.routing.hash_seed;
        const std::uint64_t h =
            !in.token_ids.empty()
                ? smear::detail::hash_tokens(in.token_ids.subspan(b * x.length, x.valid(b)), seed)
                : smear::detail::hash_id(in.example_ids.empty() ? b : in.example_ids[b], seed);
        e = static_cast<std::size_t>(h % N);
      }
      weights_host_[b * N + e] = T(1);
      choices_host_[b] = static_cast<std::int32_t>(e);
    }
  }

  std::size_t P() const noexcept { return bank_.parameter_count(); }
  std::size_t weight_offset() const noexcept { return router_.options().layer_norm ? 2 * input_dim() : 0; }
  T inv_temperature() const noexcept { return static_cast<T>(1.0 / router_.options().temperature); }

  void check_input(tokens<const T> x, const char* op) const {
    const auto shape = smear::detail::shape(x.batch, x.length, x.dim);
    if (x.batch == 0 || x.length == 0)
      throw value_error(smear::detail::message(op, ": empty batch, x is [B, L, d] = ", shape));
    if (x.data == nullptr) throw value_error(smear::detail::message(op, ": x has no data"));
    if (x.dim != input_dim())
      throw shape_error(smear::detail::message(op, ": x is [B, L, d] = ", shape,
                                               ", the experts expect d = ", input_dim()));
    if (!x.lengths.empty()) {
      if (x.lengths.size() != x.batch)
        throw shape_error(smear::detail::message(op, ": lengths has ", x.lengths.size(),
                                                 " entries, expected B = ", x.batch, " (x is ", shape, ")"));
      for (std::size_t b = 0; b < x.batch; ++b)
        if (x.lengths[b] < 1 || static_cast<std::size_t>(x.lengths[b]) > x.length)
          throw value_error(smear::detail::message(op, ": example ", b, " has length ", x.lengths[b],
                                                   ", expected 1..L = 1..", x.length,
                                                   " (an all-padding example cannot be routed)"));
    }
  }

  /// Copies the lengths to the device; null when every example is full (no mask needed).
  const std::int32_t* upload_lengths(tokens<const T> x) {
    bool full = true;
    for (auto l : x.lengths) full = full && static_cast<std::size_t>(l) == x.length;
    if (full) return nullptr;
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

  void reserve(std::size_t B, std::size_t L) {
    const std::size_t d = input_dim(), dout = output_dim();
    if (lengths_.capacity() < B) lengths_host_.clear();  // reallocated: upload again
    if (keep_.capacity() < B * N) keep_ones_ = 0;
    lengths_.reserve(B, "the lengths");
    pooled_.reserve(B * d, "the pooled inputs");
    if (router_.options().layer_norm) {
      normed_.reserve(B * d, "the normalised pooled inputs");
      features_.reserve(B * d, "the router features");
      rstd_.reserve(B, "the LayerNorm scales");
      ln_stats_.reserve(2 * B, "the LayerNorm statistics");
      ln_tmp_.reserve(B * d, "the LayerNorm workspace");
      ln_tmp2_.reserve(B * d, "the LayerNorm workspace");
    }
    logits_.reserve(B * N, "the logits");
    soft_.reserve(B * N, "the softmax");
    used_.reserve(B * N, "the routing probabilities");
    keep_.reserve(B * N, "the dropout mask");
    kept_.reserve(B, "the dropout normalisers");
    dlogits_.reserve(B * N, "the logit gradients");
    dfeatures_.reserve(B * d, "the feature gradients");
    merged_.reserve(B * P(), "the merged parameters [B, P]");
    gmerged_.reserve(B * P(), "the merged parameters' gradients [B, P]");
    dprobs_.reserve(B * N, "the probability gradients");
    const bool ens = opt_.routing.strategy == strategy::ensemble;
    saved_.reserve((ens ? N : 1) * kernel_.saved_size(B, L), "the experts' saved activations");
    const bool topk = opt_.routing.strategy == strategy::top_k;
    if (topk) {
      const auto est = opt_.routing.estimator;
      const std::size_t k = est == estimator::st_gumbel ? opt_.routing.k : est == estimator::dselect ? N : 1;
      saved_.reserve(k * kernel_.saved_size(B, L), "the experts' saved activations");
      merged_.reserve(k * B * P(), "the chosen experts' parameters [k, B, P]");
      onehot_.reserve(k * B * N, "the one-hot selections");
      coef_.reserve(B * k, "the slots' coefficients");
      outputs_.reserve(k * B * L * dout, "the chosen experts' outputs [k, B, L, d_out]");
      dye_.reserve(B * L * dout, "the scaled output gradient");
      dxe_.reserve(B * L * d, "the per-slot input gradient");
    }
    if (ens) {
      outputs_.reserve(N * B * L * dout, "the ensemble's expert outputs [N, B, L, d_out]");
      dye_.reserve(B * L * dout, "the ensemble's scaled output gradient");
      dxe_.reserve(B * L * d, "the ensemble's per-expert input gradient");
    }
    if (ones_count_ < std::max(d, B)) {
      ones_.reserve(std::max(d, B), "a ones vector");
      detail::fill(ctx_->policy(), ones_.data(), std::max(d, B), T(1));
      ones_count_ = std::max(d, B);
    }
    scratch_.reserve(kernel_.scratch_size(B, L), "the experts' scratch");
    dy_masked_.reserve(B * L * dout, "the masked output gradient");
    if (!groups_.empty()) onehot_.reserve(groups_.size() * B * N, "AdaMix's one-hot selections");
    batch_ = B;
  }

  template <class V>
  using buf = typename Ctx::template buffer<V>;

  std::unique_ptr<Ctx> ctx_;
  expert_bank<Expert, N> bank_;
  smear::router<T> router_;
  layer_options opt_;
  bool residual_;
  bool training_ = true;
  rng gen_;
  device_expert<Expert, Ctx> kernel_;
  buf<T> bank_values_, bank_grads_, router_values_, router_grads_;
  buf<std::int32_t> lengths_;
  buf<T> pooled_, normed_, features_, rstd_, logits_, soft_, used_, keep_, kept_, dlogits_,
      dfeatures_, merged_, gmerged_, dprobs_, saved_, scratch_, dy_masked_, ln_stats_, ln_tmp_, ln_tmp2_,
      ones_, onehot_, outputs_, dye_, dxe_, coef_;
  std::vector<T> keep_host_, routing_host_, check_host_;
  std::size_t batch_ = 0;
  tokens<const T> last_{};
  const std::int32_t* last_lengths_ = nullptr;
  bool pending_backward_ = false, last_routed_ = true, choices_valid_ = false;
  std::vector<T> weights_host_, soft_host_, dw_host_, onehot_host_;
  std::vector<std::int32_t> tags_host_;
  std::optional<latent_skills<T>> skills_;
  std::vector<parameter_range> groups_;
  bool last_gather_ = false, last_ensemble_ = false, last_topk_ = false, was_training_ = true;
  std::optional<reinforce_baseline<T>> baseline_;
  std::vector<T> z_host_, coef_host_, dcoef_host_, features_host_, base_host_;
  std::size_t slots_ = 1, choice_cols_ = 1;
  bool last_dselect_ = false;
  std::vector<T> gates_host_, r_host_, dr_host_;
  T aux_ = 0;
  std::size_t ones_count_ = 0;
  std::vector<std::int32_t> lengths_host_;  // the lengths now on the device
  std::size_t keep_ones_ = 0;               // leading entries of keep_ known to be 1 on the device
  std::vector<std::int32_t> choices_host_;
};

}  // namespace smear::device
