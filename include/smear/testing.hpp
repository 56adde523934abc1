#pragma once
/// \file testing.hpp
/// Finite-difference gradient checks for users' own experts and layers, the ones smear's own
/// tests run: call them from any test framework and assert on the reports. Experts and layers
/// are checked in double precision on the reference backend.
///
/// Example (doctest):
/// ```
/// for (const auto& r : smear::testing::check_expert(my_expert{6, 3}, /*rows=*/5, /*seed=*/1))
///   CHECK_MESSAGE(r.worst < 1e-5, r.what << " at " << r.index);
/// ```

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "smear/backend/tags.hpp"
#include "smear/concepts.hpp"
#include "smear/random.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/tensor.hpp"

namespace smear::testing {

/// How one analytic gradient compares with central differences.
struct gradient_report {
  std::string what;       ///< the tensor ("parameters", "input", a layer parameter's name)
  double worst = 0;       ///< max_i |n_i − a_i| / (|n_i| + |a_i| + 1e-3)
  std::size_t index = 0;  ///< where the worst error is
  double numeric = 0, analytic = 0;  ///< both gradients there
};

/// Compares `analytic` with central differences of `loss` in every coordinate of `x` (changed
/// in place and restored; `loss` must recompute everything from `x`).
inline gradient_report compare_gradient(std::string what, std::span<double> x, std::span<const double> analytic,
                                        const std::function<double()>& loss, double h = 1e-5) {
  gradient_report r{std::move(what)};
  for (std::size_t i = 0; i < x.size() && i < analytic.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    const double err = std::abs(numeric - analytic[i]) / (std::abs(numeric) + std::abs(analytic[i]) + 1e-3);
    if (err > r.worst || std::isnan(err)) r = {r.what, err, i, numeric, analytic[i]};
  }
  if (x.size() != analytic.size()) r.worst = HUGE_VAL;  // a gradient of the wrong size never passes
  return r;
}

/// Standard normal values times `scale`, drawn from `gen`.
template <class T>
std::vector<T> random_vector(std::size_t n, rng& gen, double scale = 1.0) {
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(scale * gen.normal());
  return v;
}

/// Checks an expert's backward (parameter and input gradients) on `rows` random rows with
/// random parameters, against ℓ = Σ w ⊙ f(x; θ) for random w.
template <class E>
std::vector<gradient_report> check_expert(const E& e, std::size_t rows, std::uint64_t seed) {
  static_assert(differentiable_expert<E> && std::is_same_v<typename E::value_type, double>,
                "smear::testing::check_expert: check a differentiable expert with value_type double");
  rng gen{seed};
  auto params = random_vector<double>(e.parameter_count(), gen, 0.5);
  auto x = random_vector<double>(rows * e.input_dim(), gen);
  const auto w = random_vector<double>(rows * e.output_dim(), gen);
  std::vector<double> y(rows * e.output_dim()), saved(e.saved_size(rows));
  auto loss = [&] {
    e.forward(backend::reference{}, std::span<const double>(params),
              matrix_ref<const double>{x.data(), rows, e.input_dim()}, matrix_ref<double>{y.data(), rows, e.output_dim()},
              std::span<double>(saved));
    double s = 0;
    for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
    return s;
  };
  loss();
  std::vector<double> dparams(e.parameter_count(), 99.0), dx(x.size(), 99.0), scratch(e.scratch_size(rows));
  e.backward(backend::reference{}, std::span<const double>(params), matrix_ref<const double>{x.data(), rows, e.input_dim()},
             std::span<const double>(saved), matrix_ref<const double>{w.data(), rows, e.output_dim()},
             matrix_ref<double>{dx.data(), rows, e.input_dim()}, std::span<double>(dparams), std::span<double>(scratch));
  return {compare_gradient("parameters", params, dparams, loss), compare_gradient("input", x, dx, loss)};
}

/// Checks every gradient of a double-precision layer (each tensor of parameters() but a
/// learned REINFORCE baseline's, and the input) against central differences of
/// ℓ = Σ w ⊙ y + auxiliary_loss() on a random batch of B examples padded to L with `lengths`.
/// The layer is reseeded before each forward, so every sampled decision repeats; its
/// parameters are randomised (scale 0.5) first, so every path carries signal.
template <class Layer>
std::vector<gradient_report> check_layer(Layer& block, std::size_t B, std::size_t L,
                                         std::span<const std::int32_t> lengths, std::uint64_t seed,
                                         route_inputs in = {}) {
  static_assert(std::is_same_v<typename Layer::value_type, double>,
                "smear::testing::check_layer: check a layer whose experts use double");
  rng gen{seed};
  const std::size_t din = block.input_dim(), dout = block.output_dim();
  auto x = random_vector<double>(B * L * din, gen);
  const auto w = random_vector<double>(B * L * dout, gen);
  for (auto& p : block.parameters())
    for (auto& v : p.value) v = 0.5 * gen.normal();
  std::vector<double> y(B * L * dout), dx(x.size());
  const auto xs = make_tokens<const double>(x.data(), B, L, din, lengths);
  auto loss = [&] {
    block.invalidate_cache();  // parameters are written through spans held from before
    block.reseed(seed);
    block.forward(xs, y, in);
    double s = block.auxiliary_loss();
    for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
    return s;
  };
  loss();
  block.zero_grad();
  block.backward(w, dx);
  std::vector<gradient_report> out;
  for (auto& p : block.parameters()) {
    if (p.name.starts_with("baseline.")) continue;  // trained on its own loss
    const std::vector<double> analytic(p.grad.begin(), p.grad.end());
    out.push_back(compare_gradient(p.name, p.value, analytic, loss));
  }
  out.push_back(compare_gradient("input", x, dx, loss));
  return out;
}

}  // namespace smear::testing
