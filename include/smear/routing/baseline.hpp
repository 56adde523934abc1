#pragma once
/// \file routing/baseline.hpp
/// The baseline REINFORCE subtracts from each example's loss: a moving average of the loss,
/// or (as the official SMEAR code) a linear–linear net on the detached router features,
/// trained to predict the loss by squared error or (the official code's) Huber loss.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "smear/parameter.hpp"
#include "smear/random.hpp"
#include "smear/replicas.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/tensor.hpp"

namespace smear {

template <class T>
class reinforce_baseline {
 public:
  reinforce_baseline(smear::baseline kind, std::size_t dim, std::size_t hidden, double momentum,
                     rng& gen, smear::value_loss loss = value_loss::squared, double delta = 1.0)
      : kind_(kind), d_(dim), h_(hidden), momentum_(momentum), loss_(loss), delta_(delta) {
    if (kind_ != baseline::learned) return;
    values_.assign(h_ * d_ + h_ + h_ + 1, T(0));
    grads_.assign(values_.size(), T(0));
    const double scale = 1.0 / std::sqrt(static_cast<double>(d_));
    for (std::size_t i = 0; i < h_ * d_; ++i) values_[i] = static_cast<T>(scale * gen.normal());
    for (std::size_t i = 0; i < h_; ++i) values_[h_ * d_ + h_ + i] = static_cast<T>(0.01 * gen.normal());
  }

  smear::baseline kind() const noexcept { return kind_; }
  /// The moving average (meaningful for the moving-average kind once a loss was seen).
  T average() const noexcept { return average_; }
  std::span<T> values() noexcept { return values_; }
  std::span<const T> values() const noexcept { return values_; }
  std::span<T> gradients() noexcept { return grads_; }
  void zero_grad() noexcept { std::fill(grads_.begin(), grads_.end(), T(0)); }

  void append_parameters(parameter_list<T>& out, const std::string& prefix) {
    if (kind_ == baseline::learned) out.push_back({prefix + "parameters", values_, grads_, false, false, {values_.size()}});
  }

  /// The baseline for each example (features [B, d], the router's detached input; only the
  /// learned kind reads them). A moving average not yet started takes the batch's mean loss
  /// (the global batch's, over `replicas`).
  void predict(matrix_ref<const T> features, std::span<const T> losses, std::span<T> out,
               replica_group<T>* replicas = nullptr) {
    const std::size_t B = losses.size();
    if (kind_ == baseline::moving_average) {
      mean_ = mean_loss(losses, replicas);
      if (!started_) {
        average_ = mean_;
        started_ = true;
      }
      std::fill(out.begin(), out.end(), average_);
      return;
    }
    hidden_.resize(B * h_);
    for (std::size_t b = 0; b < B; ++b) {
      T o = values_[2 * h_ + h_ * d_];
      for (std::size_t i = 0; i < h_; ++i) {
        T a = values_[h_ * d_ + i];
        for (std::size_t j = 0; j < d_; ++j) a += values_[i * d_ + j] * features(b, j);
        hidden_[b * h_ + i] = a;
        o += values_[h_ * d_ + h_ + i] * a;
      }
      out[b] = o;
    }
  }

  /// After predict(): moves the average by the mean loss predict() saw, or accumulates the
  /// gradient of the learned baseline's value loss: mean_b (baseline_b − loss_b)², or
  /// mean_b huber_δ(baseline_b − loss_b) (the batch's mean: average it over replicas).
  void update(matrix_ref<const T> features, std::span<const T> losses, std::span<const T> predicted) {
    const std::size_t B = losses.size();
    if (kind_ == baseline::moving_average) {
      average_ = static_cast<T>(momentum_) * average_ + static_cast<T>(1 - momentum_) * mean_;
      return;
    }
    T* gw1 = grads_.data();
    T* gb1 = gw1 + h_ * d_;
    T* gw2 = gb1 + h_;
    T* gb2 = gw2 + h_;
    const T* w2 = values_.data() + h_ * d_ + h_;
    for (std::size_t b = 0; b < B; ++b) {
      const T r = value_loss_derivative(predicted[b] - losses[b]) / static_cast<T>(B);
      *gb2 += r;
      for (std::size_t i = 0; i < h_; ++i) {
        gw2[i] += r * hidden_[b * h_ + i];
        const T dh = r * w2[i];
        gb1[i] += dh;
        for (std::size_t j = 0; j < d_; ++j) gw1[i * d_ + j] += dh * features(b, j);
      }
    }
  }

 private:
  /// The mean of `losses`, or of every replica's losses.
  static T mean_loss(std::span<const T> losses, replica_group<T>* replicas) {
    T sum_count[2] = {T(0), static_cast<T>(losses.size())};
    for (auto l : losses) sum_count[0] += l;
    detail::sum_over_replicas<T>(replicas, sum_count);
    return sum_count[0] / sum_count[1];
  }

  /// ∂/∂r of the value loss of one example at residual r.
  T value_loss_derivative(T r) const noexcept {
    if (loss_ == value_loss::squared) return T(2) * r;
    const T delta = static_cast<T>(delta_);
    return std::clamp(r, -delta, delta);
  }

  smear::baseline kind_;
  std::size_t d_, h_;
  double momentum_;
  smear::value_loss loss_;
  double delta_;
  T average_ = 0;
  T mean_ = 0;  ///< the mean loss of predict()'s batch
  bool started_ = false;
  std::vector<T> values_, grads_, hidden_;
};

}  // namespace smear
