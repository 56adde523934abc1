#pragma once
/// \file routing/dselect.hpp
/// DSelect-k's selector for k = 1 (Hazimeh et al., 2021): K = ⌈log₂ N⌉ gate logits, each
/// through a smooth step, choose an expert by its binary code. The weight of code e is
/// r_e = Π_i (bit_i(e) ? g_i : 1 − g_i); the codes sum to 1, codes ≥ N are unused.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>

namespace smear::dselect {

/// The smooth step of width γ: 0 below −γ/2, 1 above γ/2, −2t³/γ³ + 3t/(2γ) + ½ between.
inline double smooth_step(double t, double gamma) noexcept {
  if (t <= -gamma / 2) return 0.0;
  if (t >= gamma / 2) return 1.0;
  return -2.0 * t * t * t / (gamma * gamma * gamma) + 1.5 * t / gamma + 0.5;
}

/// Its derivative.
inline double smooth_step_derivative(double t, double gamma) noexcept {
  if (t <= -gamma / 2 || t >= gamma / 2) return 0.0;
  return -6.0 * t * t / (gamma * gamma * gamma) + 1.5 / gamma;
}

/// Weights of the 2^K codes: r[e] for gates g (K values). `r` has 2^K entries.
template <class T>
void code_weights(std::span<const T> g, std::span<T> r) noexcept {
  for (std::size_t e = 0; e < r.size(); ++e) {
    T w = T(1);
    for (std::size_t i = 0; i < g.size(); ++i) w *= ((e >> i) & 1u) ? g[i] : T(1) - g[i];
    r[e] = w;
  }
}

/// Given ∂ℓ/∂r for every code, writes ∂ℓ/∂g (K values).
template <class T>
void code_weights_backward(std::span<const T> g, std::span<const T> dr, std::span<T> dg) noexcept {
  std::fill(dg.begin(), dg.end(), T(0));
  for (std::size_t e = 0; e < dr.size(); ++e) {
    if (dr[e] == T(0)) continue;
    for (std::size_t i = 0; i < g.size(); ++i) {
      T others = T(1);  // Π_{j ≠ i}
      for (std::size_t j = 0; j < g.size(); ++j)
        if (j != i) others *= ((e >> j) & 1u) ? g[j] : T(1) - g[j];
      dg[i] += dr[e] * (((e >> i) & 1u) ? others : -others);
    }
  }
}

}  // namespace smear::dselect
