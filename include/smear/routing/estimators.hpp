#pragma once
/// \file routing/estimators.hpp
/// The per-example decisions and router gradients of top-k routing, in one place for every
/// backend: the Gumbel-softmax sample and its straight-through backward, REINFORCE's sample and
/// score-function gradient, DSelect-k's selection and its gradient. Host-side math over one
/// example's N (or K) values; each backend runs it on the router's logits.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "smear/random.hpp"
#include "smear/routing/dselect.hpp"

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
    if (bonus > T(0) && p[i] > T(0)) dz[i] += bonus * p[i] * (std::log(p[i]) + T(1) - hdot) * inv_t;
  }
}

}  // namespace smear::estimate

namespace smear::dselect {

/// What select() reports of one example's code weights.
template <class T>
struct selection {
  T entropy;  ///< −Σ r log r over every code
  T unused;   ///< Σ r over the codes ≥ N
};

/// One example's DSelect-k selection from its K gate logits z: gates g = smooth_step(z), code
/// weights r (2^K values), and w = r normalised over the N experts (uniform if all are zero).
template <class T>
selection<T> select(std::span<const T> z, double gamma, std::span<T> gates, std::span<T> r, std::span<T> w) {
  for (std::size_t i = 0; i < z.size(); ++i)
    gates[i] = static_cast<T>(smooth_step(static_cast<double>(z[i]), gamma));
  code_weights<T>(gates, r);
  const std::size_t N = w.size();
  T used = 0, unused = 0;
  for (std::size_t e = 0; e < r.size(); ++e) (e < N ? used : unused) += r[e];
  for (std::size_t e = 0; e < N; ++e) w[e] = used > T(0) ? r[e] / used : T(1) / static_cast<T>(N);
  return {estimate::entropy<T>(r), unused};
}

/// Given dr (∂ℓ/∂r of the codes the caller ran), adds the regularisers' gradients
/// (entropy_weight · H(r) + unused_weight · Σ_{e ≥ N} r_e, both already divided by B) and writes
/// ∂ℓ/∂z for the K gate logits. `dr` is modified.
template <class T>
void select_backward(std::span<const T> z, double gamma, std::span<const T> gates, std::span<const T> r,
                     std::size_t experts, T entropy_weight, T unused_weight, std::span<T> dr, std::span<T> dz) {
  for (std::size_t e = 0; e < r.size(); ++e) {
    if (!(r[e] > T(0))) continue;
    dr[e] += entropy_weight * (-std::log(r[e]) - T(1));
    if (e >= experts) dr[e] += unused_weight;
  }
  std::array<T, 64> dg{};
  code_weights_backward<T>(gates, dr, {dg.data(), z.size()});
  for (std::size_t i = 0; i < z.size(); ++i)
    dz[i] = dg[i] * static_cast<T>(smooth_step_derivative(static_cast<double>(z[i]), gamma));
}

}  // namespace smear::dselect
