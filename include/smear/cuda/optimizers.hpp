#pragma once
/// \file cuda/optimizers.hpp
/// AdamW and SGD over the cuda layer's parameters(): the tensors in a context's memory are
/// stepped by a Thrust kernel on the context's stream, the planner's host tensors by a loop;
/// both run the host optimisers' update rules (smear::adamw_update, smear::sgd_update), so a
/// training loop is the same code on every backend:
///
/// ```
/// smear::device::adamw<float, smear::device::context> opt{block.parameters(), {.lr = 3e-4}, block.context()};
/// block.forward(x, y); block.backward(dy, dx); opt.step(); opt.zero_grad();
/// ```

#include <algorithm>
#include <cstddef>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/error.hpp"
#include "smear/optim/adamw.hpp"
#include "smear/optim/sgd.hpp"
#include "smear/parameter.hpp"

namespace smear::device {

namespace detail {

template <class T>
struct adamw_fn {
  T *value, *m, *v;
  const T* grad;
  adamw_update<T> update;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const { update(value[i], grad[i], m[i], v[i]); }
};

template <class T>
struct sgd_fn {
  T *value, *v;
  const T* grad;
  sgd_update<T> update;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const { update(value[i], grad[i], v[i]); }
};

/// Per parameter, `slots` state vectors of its size, zeroed, in the memory the parameter is in.
template <class T, class Ctx>
class optimizer_state {
 public:
  optimizer_state(const parameter_list<T>& params, std::size_t slots, Ctx& ctx, const char* name) : ctx_(&ctx) {
    for (const auto& p : params) {
      if (p.value.size() != p.grad.size())
        throw shape_error(smear::detail::message(name, ": parameter '", p.name, "' has ", p.value.size(),
                                                 " values but ", p.grad.size(), " gradients"));
      for (std::size_t s = 0; s < slots; ++s) {
        device_.emplace_back();
        host_.emplace_back(p.on_device ? 0 : p.value.size(), T(0));
        if (!p.on_device) continue;
        device_.back().reserve(p.value.size(), "an optimiser's state");
        fill(ctx.policy(), device_.back().data(), p.value.size(), T(0));
      }
    }
  }
  /// State vector s of parameter i, where that parameter lives.
  T* at(std::size_t i, std::size_t slots, std::size_t s, bool on_device) {
    return on_device ? device_[i * slots + s].data() : host_[i * slots + s].data();
  }
  Ctx& context() noexcept { return *ctx_; }

 private:
  Ctx* ctx_;
  std::vector<typename Ctx::template buffer<T>> device_;
  std::vector<std::vector<T>> host_;
};

/// Sets every gradient of `params` to zero, where each lives.
template <class T, class Ctx>
void zero_gradients(parameter_list<T>& params, Ctx& ctx) {
  for (auto& p : params)
    if (p.on_device)
      fill(ctx.policy(), p.grad.data(), p.grad.size(), T(0));
    else
      std::fill(p.grad.begin(), p.grad.end(), T(0));
}

}  // namespace detail

/// smear::adamw for parameter lists that hold tensors in `Ctx`'s memory.
template <class T, class Ctx>
class adamw {
 public:
  adamw(parameter_list<T> params, adamw_options options, Ctx& ctx)
      : host_(parameter_list<T>{}, options), params_(std::move(params)), state_(params_, 2, ctx, "adamw") {}

  void step() {
    ++t_;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      const auto update = smear::adamw<T>::update_for(host_.options(), t_, p.decay);
      T* m = state_.at(i, 2, 0, p.on_device);
      T* v = state_.at(i, 2, 1, p.on_device);
      if (p.on_device)
        detail::for_each_index(state_.context().policy(), p.value.size(),
                               detail::adamw_fn<T>{p.value.data(), m, v, p.grad.data(), update});
      else
        for (std::size_t j = 0; j < p.value.size(); ++j) update(p.value[j], p.grad[j], m[j], v[j]);
    }
  }
  void zero_grad() { detail::zero_gradients(params_, state_.context()); }
  void set_lr(double lr) { host_.set_lr(lr); }
  const adamw_options& options() const { return host_.options(); }
  std::size_t steps() const { return t_; }

 private:
  smear::adamw<T> host_;  ///< holds and validates the options
  parameter_list<T> params_;
  detail::optimizer_state<T, Ctx> state_;
  std::size_t t_ = 0;
};

/// smear::sgd for parameter lists that hold tensors in `Ctx`'s memory.
template <class T, class Ctx>
class sgd {
 public:
  sgd(parameter_list<T> params, sgd_options options, Ctx& ctx)
      : host_(parameter_list<T>{}, options), params_(std::move(params)), state_(params_, 1, ctx, "sgd") {}

  void step() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      const auto update = smear::sgd<T>::update_for(host_.options(), p.decay);
      T* v = state_.at(i, 1, 0, p.on_device);
      if (p.on_device)
        detail::for_each_index(state_.context().policy(), p.value.size(),
                               detail::sgd_fn<T>{p.value.data(), v, p.grad.data(), update});
      else
        for (std::size_t j = 0; j < p.value.size(); ++j) update(p.value[j], p.grad[j], v[j]);
    }
  }
  void zero_grad() { detail::zero_gradients(params_, state_.context()); }
  void set_lr(double lr) { host_.set_lr(lr); }
  const sgd_options& options() const { return host_.options(); }

 private:
  smear::sgd<T> host_;  ///< holds and validates the options
  parameter_list<T> params_;
  detail::optimizer_state<T, Ctx> state_;
};

}  // namespace smear::device
