#pragma once
/// \file optim/adamw.hpp
/// Adam with decoupled weight decay (Loshchilov & Hutter).

#include <cmath>
#include <cstddef>
#include <vector>

#include "smear/error.hpp"
#include "smear/parameter.hpp"

namespace smear {

struct adamw_options {
  double lr = 3e-4;  ///< the official SMEAR code's learning rate
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  ///< θ ← θ − lr·λ·θ, only for parameters with `decay`
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
      if (p.value.size() != p.grad.size())
        throw shape_error(detail::message("adamw: parameter '", p.name, "' has ", p.value.size(),
                                          " values but ", p.grad.size(), " gradients"));
      m_.emplace_back(p.value.size(), T(0));
      v_.emplace_back(p.value.size(), T(0));
    }
  }

  void step() {
    ++t_;
    const double c1 = 1.0 - std::pow(opt_.beta1, static_cast<double>(t_));
    const double c2 = 1.0 - std::pow(opt_.beta2, static_cast<double>(t_));
    const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2);
    const T step = static_cast<T>(opt_.lr / c1), rc2 = static_cast<T>(1.0 / std::sqrt(c2));
    const T eps = static_cast<T>(opt_.eps);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      const T decay = p.decay ? static_cast<T>(1.0 - opt_.lr * opt_.weight_decay) : T(1);
      auto& m = m_[i];
      auto& v = v_[i];
      for (std::size_t j = 0; j < p.value.size(); ++j) {
        const T g = p.grad[j];
        m[j] = b1 * m[j] + (T(1) - b1) * g;
        v[j] = b2 * v[j] + (T(1) - b2) * g * g;
        p.value[j] = p.value[j] * decay - step * m[j] / (std::sqrt(v[j]) * rc2 + eps);
      }
    }
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
