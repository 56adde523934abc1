#pragma once
/// \file optim/adamw.hpp
/// Adam with decoupled weight decay (Loshchilov & Hutter).

#include <cmath>
#include <cstddef>
#include <vector>

#include "smear/error.hpp"
#include "smear/host_device.hpp"
#include "smear/parameter.hpp"

namespace smear {

struct adamw_options {
  double lr = 3e-4;  ///< the official SMEAR code's learning rate
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  ///< θ ← θ − lr·λ·θ, only for parameters with `decay`
};

/// One AdamW step of one value, for step t's constants: the update every AdamW runs (host
/// loops, the device optimiser's kernel).
template <class T>
struct adamw_update {
  T b1, b2, step, rc2, eps, decay;
  SMEAR_HOST_DEVICE void operator()(T& value, T g, T& m, T& v) const {
    m = b1 * m + (T(1) - b1) * g;
    v = b2 * v + (T(1) - b2) * g * g;
    value = value * decay - step * m / (detail::sqrt_of(v) * rc2 + eps);
  }
};

/// m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; θ ← θ − lr·(λθ + m̂ / (√v̂ + ε)).
///
/// Example: `smear::adamw<float> opt{block.parameters(), {.lr = 3e-4}}; ... opt.step();`
template <class T>
class adamw {
 public:
  explicit adamw(parameter_list<T> params, adamw_options options = {})
      : params_(std::move(params)), opt_(options) {
    if (!(opt_.lr >= 0.0)) throw value_error(detail::message("adamw: lr must be >= 0, got ", opt_.lr));
    if (!(opt_.beta1 >= 0.0 && opt_.beta1 < 1.0 && opt_.beta2 >= 0.0 && opt_.beta2 < 1.0))
      throw value_error(detail::message("adamw: betas must be in [0, 1), got ", opt_.beta1, ", ",
                                        opt_.beta2));
    if (!(opt_.eps > 0.0)) throw value_error(detail::message("adamw: eps must be > 0, got ", opt_.eps));
    for (const auto& p : params_) {
      detail::require_host(p, "adamw");
      if (p.value.size() != p.grad.size())
        throw shape_error(detail::message("adamw: parameter '", p.name, "' has ", p.value.size(),
                                          " values but ", p.grad.size(), " gradients"));
      m_.emplace_back(p.value.size(), T(0));
      v_.emplace_back(p.value.size(), T(0));
    }
  }

  void step() {
    ++t_;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      const auto update = update_for(opt_, t_, p.decay);
      for (std::size_t j = 0; j < p.value.size(); ++j) update(p.value[j], p.grad[j], m_[i][j], v_[i][j]);
    }
  }

  /// The update of step t (counted from 1) for a parameter with or without weight decay.
  static adamw_update<T> update_for(const adamw_options& o, std::size_t t, bool decay) {
    const double c1 = 1.0 - std::pow(o.beta1, static_cast<double>(t));
    const double c2 = 1.0 - std::pow(o.beta2, static_cast<double>(t));
    return {static_cast<T>(o.beta1), static_cast<T>(o.beta2), static_cast<T>(o.lr / c1),
            static_cast<T>(1.0 / std::sqrt(c2)), static_cast<T>(o.eps),
            decay ? static_cast<T>(1.0 - o.lr * o.weight_decay) : T(1)};
  }

  void zero_grad() {
    for (auto& p : params_)
      for (auto& g : p.grad) g = T(0);
  }

  void set_lr(double lr) { opt_.lr = lr; }
  const adamw_options& options() const { return opt_; }
  std::size_t steps() const { return t_; }

 private:
  parameter_list<T> params_;
  adamw_options opt_;
  std::vector<std::vector<T>> m_, v_;
  std::size_t t_ = 0;
};

}  // namespace smear
