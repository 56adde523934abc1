#pragma once
// Shared test helpers: random tensors, tolerances scaled to the element type, and the one
// finite-difference gradient checker every backward pass in smear is tested with.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "smear/random.hpp"

namespace smear::testing {

template <class T>
std::vector<T> random_vector(std::size_t n, rng& gen, double scale = 1.0) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(scale * gen.normal());
  return v;
}

/// Relative tolerance for comparing two computations of the same value in T.
template <class T>
constexpr double tolerance() {
  return sizeof(T) == 4 ? 2e-4 : 1e-10;
}

/// max_i |a_i - b_i| / (max_i |b_i| + 1)
template <class A, class B>
double relative_error(const A& a, const B& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return diff / (scale + 1.0);
}

/// Checks an analytic gradient against central differences of `loss` in every coordinate
/// of `x` (changed in place and restored). `loss` must recompute everything from `x`.
inline void check_gradient(const std::string& what, std::span<double> x,
                           std::span<const double> analytic, const std::function<double()>& loss,
                           double h = 1e-5, double tol = 1e-5) {
  REQUIRE(x.size() == analytic.size());
  double worst = 0;
  std::size_t worst_i = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    const double err = std::abs(numeric - analytic[i]) / (std::abs(numeric) + std::abs(analytic[i]) + 1e-3);
    if (err > worst) {
      worst = err;
      worst_i = i;
    }
  }
  INFO(what << ": worst relative error " << worst << " at index " << worst_i);
  CHECK(worst < tol);
}

/// ℓ = Σ w ⊙ y, a loss whose gradient ∂ℓ/∂y = w is known.
inline double weighted_sum(std::span<const double> y, std::span<const double> w) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
  return s;
}

}  // namespace smear::testing
