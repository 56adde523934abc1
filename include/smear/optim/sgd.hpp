#pragma once
/// \file optim/sgd.hpp
/// Stochastic gradient descent with momentum (and optional Nesterov) and L2 weight decay.

#include <cstddef>
#include <vector>

#include "smear/error.hpp"
#include "smear/host_device.hpp"
#include "smear/parameter.hpp"

namespace smear {

struct sgd_options {
  double lr = 1e-2;
  double momentum = 0.9;
  double weight_decay = 0.0;  ///< added to the gradient as weight_decay·θ, where `decay` is set
  bool nesterov = false;
};

/// One SGD step of one value: the update every SGD runs (host loops, the device optimiser's kernel).
template <class T>
struct sgd_update {
  T lr, mu, wd;
  bool nesterov;
  SMEAR_HOST_DEVICE void operator()(T& value, T grad, T& v) const {
    const T g = grad + wd * value;
    v = mu * v + g;
    value -= lr * (nesterov ? g + mu * v : v);
  }
};

/// v ← μ·v + g (+ λ·θ);  θ ← θ − lr·v  (or − lr·(g + μ·v) with Nesterov).
///
/// Example: `smear::sgd<float> opt{block.parameters(), {.lr = 0.1}}; ... opt.step();`
template <class T>
class sgd {
 public:
  explicit sgd(parameter_list<T> params, sgd_options options = {})
      : params_(std::move(params)), opt_(options) {
    if (!(opt_.lr >= 0.0)) throw value_error(detail::message("sgd: lr must be >= 0, got ", opt_.lr));
    if (!(opt_.momentum >= 0.0 && opt_.momentum < 1.0))
      throw value_error(detail::message("sgd: momentum must be in [0, 1), got ", opt_.momentum));
    for (const auto& p : params_) {
      detail::require_host(p, "sgd");
      if (p.value.size() != p.grad.size())
        throw shape_error(detail::message("sgd: parameter '", p.name, "' has ", p.value.size(),
                                          " values but ", p.grad.size(), " gradients"));
      velocity_.emplace_back(p.value.size(), T(0));
    }
  }

  void step() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      const auto update = update_for(opt_, p.decay);
      for (std::size_t j = 0; j < p.value.size(); ++j) update(p.value[j], p.grad[j], velocity_[i][j]);
    }
  }

  /// The update for a parameter with or without weight decay.
  static sgd_update<T> update_for(const sgd_options& o, bool decay) {
    return {static_cast<T>(o.lr), static_cast<T>(o.momentum), decay ? static_cast<T>(o.weight_decay) : T(0),
            o.nesterov};
  }

  void zero_grad() {
    for (auto& p : params_)
      for (auto& g : p.grad) g = T(0);
  }

  void set_lr(double lr) { opt_.lr = lr; }
  const sgd_options& options() const { return opt_; }

 private:
  parameter_list<T> params_;
  sgd_options opt_;
  std::vector<std::vector<T>> velocity_;
};

}  // namespace smear
