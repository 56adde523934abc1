#pragma once
// Shared test helpers: tolerances scaled to the element type, and doctest checks over the
// reports of smear/testing.hpp, the public finite-difference checker every backward pass in
// smear is tested with.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "smear/random.hpp"
#include "smear/testing.hpp"

namespace smear::testing {

/// CHECKs that every report's worst error is below `tol`, naming the tensor and the index.
inline void check_reports(const std::vector<gradient_report>& reports, double tol = 1e-5) {
  for (const auto& r : reports) {
    INFO(r.what << ": worst relative error " << r.worst << " at index " << r.index << " (numeric " << r.numeric
                << ", analytic " << r.analytic << ")");
    CHECK(r.worst < tol);
  }
}

/// Random (not freshly initialised) values in every parameter of a layer, N(0, scale²), so
/// every path carries signal.
template <class Layer>
void randomise(Layer& block, rng& gen, double scale = 0.3) {
  for (auto& p : block.parameters())
    for (auto& v : p.value) v = static_cast<typename Layer::value_type>(scale * gen.normal());
}

/// Copies each parameter of `from` into the parameter of `to` with the same name and size;
/// returns how many were copied.
template <class From, class To>
std::size_t copy_parameters(From& from, To& to) {
  std::size_t copied = 0;
  auto src = from.parameters(), dst = to.parameters();
  for (const auto& f : src)
    for (auto& t : dst)
      if (t.name == f.name && t.value.size() == f.value.size()) {
        std::copy(f.value.begin(), f.value.end(), t.value.begin());
        ++copied;
      }
  return copied;
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
/// of `x` (smear::testing::compare_gradient).
inline void check_gradient(const std::string& what, std::span<double> x, std::span<const double> analytic,
                           const std::function<double()>& loss, double h = 1e-5, double tol = 1e-5) {
  REQUIRE(x.size() == analytic.size());
  check_reports({compare_gradient(what, x, analytic, loss, h)}, tol);
}

/// ℓ = Σ w ⊙ y, a loss whose gradient ∂ℓ/∂y = w is known.
inline double weighted_sum(std::span<const double> y, std::span<const double> w) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
  return s;
}

}  // namespace smear::testing
