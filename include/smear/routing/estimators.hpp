#pragma once
/// \file routing/estimators.hpp
/// The per-example decisions and router gradients of top-k routing, in one place for every
/// backend: the Gumbel-softmax sample and its straight-through backward, REINFORCE's sample and
/// score-function gradient (DSelect-k's selection is in routing/dselect.hpp). Host-side math
/// over one example's N values, run by the planners on the router's logits.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "smear/random.hpp"

namespace smear::estimate {

/// s = softmax((z + g) / τ) with standard Gumbel noise g drawn from `gen` (one per entry, in
/// order) when `sample`, softmax(z / τ) otherwise. `inv_t` = 1 / τ.
template <class T>
void gumbel_softmax(std::span<const T> z, T inv_t, bool sample, rng& gen, std::span<T> s) {
  T zmax = -std::numeric_limits<T>::infinity();
  for (std::size_t e = 0; e < z.size(); ++e) {
    s[e] = (sample ? z[e] + static_cast<T>(gen.gumbel()) : z[e]) * inv_t;
    zmax = std::max(zmax, s[e]);
  }
  T sum = 0;
  for (auto& v : s) sum += (v = std::exp(v - zmax));
  for (auto& v : s) v /= sum;
}

/// The sel.size() largest entries of s, largest first (the lower index on ties).
template <class T>
void top_k(std::span<const T> s, std::span<std::int32_t> sel) {
  for (std::size_t j = 0; j < sel.size(); ++j) {
    std::size_t best = s.size();
    for (std::size_t e = 0; e < s.size(); ++e)
      if (std::find(sel.begin(), sel.begin() + static_cast<std::ptrdiff_t>(j), static_cast<std::int32_t>(e)) ==
              sel.begin() + static_cast<std::ptrdiff_t>(j) &&
          (best == s.size() || s[e] > s[best]))
        best = e;
    sel[j] = static_cast<std::int32_t>(best);
  }
}

/// e ~ p (one uniform draw from `gen`) when `sample`, the most probable expert otherwise.
template <class T>
std::size_t sample_or_argmax(std::span<const T> p, bool sample, rng& gen) {
  if (!sample) return static_cast<std::size_t>(std::max_element(p.begin(), p.end()) - p.begin());
  const double u = gen.uniform();
  double acc = 0;
  std::size_t e = 0;
  for (; e + 1 < p.size(); ++e)
    if (u < (acc += static_cast<double>(p[e]))) break;
  return e;
}

/// H(p) = −Σ p log p.
template <class T>
T entropy(std::span<const T> p) {
  T h = 0;
  for (auto v : p)
    if (v > T(0)) h -= v * std::log(v);
  return h;
}

/// Through s = softmax(u · inv_t): d ← ∂ℓ/∂u = s ⊙ (d − ⟨d, s⟩) · inv_t, in place.
template <class T>
void softmax_backward(std::span<const T> s, std::span<T> d, T inv_t) {
  T dot = 0;
  for (std::size_t e = 0; e < s.size(); ++e) dot += d[e] * s[e];
  for (std::size_t e = 0; e < s.size(); ++e) d[e] = s[e] * (d[e] - dot) * inv_t;
}

/// REINFORCE for one example with p = softmax(z · inv_t) and chosen expert e:
/// dz = adv · ∇_z log p_e − bonus · ∇_z H(p), where adv = (ℓ − baseline) / B and bonus is the
/// entropy bonus over B.
template <class T>
void reinforce_gradient(std::span<const T> p, std::size_t e, T adv, T bonus, T inv_t, std::span<T> dz) {
  T hdot = 0;  // Σ p (log p + 1), for ∂H/∂z = −p ⊙ (log p + 1 − Σ p (log p + 1)) · inv_t
  for (auto v : p)
    if (v > T(0)) hdot += v * (std::log(v) + T(1));
  for (std::size_t i = 0; i < p.size(); ++i) {
    dz[i] = adv * ((i == e ? T(1) : T(0)) - p[i]) * inv_t;
    if (bonus != T(0) && p[i] > T(0)) dz[i] += bonus * p[i] * (std::log(p[i]) + T(1) - hdot) * inv_t;
  }
}

}  // namespace smear::estimate
