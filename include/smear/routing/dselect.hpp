#pragma once
/// \file routing/dselect.hpp
/// DSelect-k's selector for k = 1 (Hazimeh et al., 2021): K = ⌈log₂ N⌉ gate logits, each
/// through a smooth step, choose an expert by its binary code. The weight of code e is
/// r_e = Π_i (bit_i(e) ? g_i : 1 − g_i); the codes sum to 1, codes ≥ N are unused.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "smear/routing/estimators.hpp"
#include "smear/routing/planner.hpp"

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

namespace smear {

/// Top-1 routing by DSelect-k: the router has K = ⌈log₂ N⌉ gate logits; in training every
/// expert with a nonzero code weight r_e runs with coefficient r_e (exact gradients to the
/// gates, plus the entropy and unused-code regularisers); at evaluation the best expert alone.
template <class T>
class dselect_planner : public planner_base<dselect_planner<T>, T> {
 public:
  dselect_planner(std::size_t experts, const strategy_options& o)
      : n_(experts), k_(ceil_log2(experts)), gamma_(o.dselect_gamma), entropy_(o.dselect_entropy),
        unused_(o.dselect_unused_penalty) {}

  router_use router(const route_context<T>&) const override { return router_use::route; }
  bool reads_router() const noexcept override { return true; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    const std::size_t B = c.batch, codes = std::size_t{1} << k_;
    out.reset(plan_kind::mixture, B, n_);
    out.resize_slots(n_);
    z_.resize(B * k_);
    gates_.resize(B * k_);
    r_.resize(B * codes);
    for (std::size_t b = 0; b < B; ++b) {
      std::copy_n(c.logits.row(b).data(), k_, z_.data() + b * k_);
      std::span<T> r{r_.data() + b * codes, codes}, w = out.weight_matrix().row(b);
      const auto picked = dselect::select<T>(c.logits.row(b), gamma_, {gates_.data() + b * k_, k_}, r, w);
      const auto best = static_cast<std::int32_t>(std::max_element(w.begin(), w.end()) - w.begin());
      out.choices[b] = best;
      std::int32_t* sel = out.expert.data() + b * n_;
      T* coef = out.coef.data() + b * n_;
      std::size_t n = 0;
      if (c.training) {
        for (std::size_t e = 0; e < n_; ++e)
          if (r[e] > T(0)) sel[n] = static_cast<std::int32_t>(e), coef[n++] = r[e];
      } else {
        sel[0] = best, coef[0] = T(1), n = 1;
      }
      out.count[b] = n;
      out.auxiliary_loss += (static_cast<T>(entropy_) * picked.entropy + static_cast<T>(unused_) * picked.unused) /
                            static_cast<T>(B);
    }
  }
  feedback_needs needs(const routing_plan<T>&, bool training) const noexcept override {
    return {.dcoef = training};
  }
  router_gradient backward(const routing_plan<T>& p, const plan_feedback<T>& fb) override {
    if (!fb.training) return router_gradient::none;  // one expert with coefficient 1: no gradient to the gates
    const std::size_t B = p.batch, codes = std::size_t{1} << k_;
    const T inv_b = T(1) / static_cast<T>(B);
    auto dz = this->gradient_buffer(B, k_);
    dr_.resize(codes);
    for (std::size_t b = 0; b < B; ++b) {
      std::fill(dr_.begin(), dr_.end(), T(0));
      for (std::size_t j = 0; j < p.count[b]; ++j) dr_[static_cast<std::size_t>(p.expert[b * n_ + j])] = fb.dcoef(b, j);
      dselect::select_backward<T>({z_.data() + b * k_, k_}, gamma_, {gates_.data() + b * k_, k_},
                                  {r_.data() + b * codes, codes}, n_, static_cast<T>(entropy_) * inv_b,
                                  static_cast<T>(unused_) * inv_b, dr_, dz.row(b));
    }
    return router_gradient::logits;
  }
  std::size_t workspace_bytes() const noexcept override {
    return planner<T>::workspace_bytes() + sizeof(T) * (z_.capacity() + gates_.capacity() + r_.capacity() + dr_.capacity());
  }

 private:
  std::size_t n_, k_;
  double gamma_, entropy_, unused_;
  std::vector<T> z_, gates_, r_, dr_;  ///< per example: logits, gates, code weights; dr scratch
};

}  // namespace smear
