#pragma once
// One backend's layer against the reference layer: the same parameters, inputs and dropout
// draws must give the same outputs, routing, choices and gradients, forward and backward. The
// one agreement check of the tests: the cpu backend (host_memory), the cuda algorithm on a CPU
// (device::host_context, host_memory) and on a GPU (device::context, with its own `Memory`:
// how tensors reach the layer's memory).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "smear/smear.hpp"
#include "support/testing.hpp"

namespace smear::testing {

/// Memory of a host layer (and of device::host_context): tensors are plain vectors.
struct host_memory {
  template <class T>
  std::vector<T> upload(std::vector<T> v) const { return v; }
  template <class T>
  std::vector<T> download(const T* p, std::size_t n) const { return std::vector<T>(p, p + n); }
};

struct agreement_case {
  std::size_t B = 3, L = 5;
  bool full = false;         ///< no lengths: every example full
  bool train = true;
  int steps = 2;             ///< forward/backward pairs; gradients accumulate across them
  bool tags = false;         ///< pass random tags in 0..N-1 (tag routing)
  bool token_ids = false;    ///< pass random token ids (hash routing; otherwise example ids)
  bool losses = false;       ///< pass random per-example losses to backward (REINFORCE)
  bool task_routing = false; ///< set_task_routing with a random [N, N] table on both layers
};

/// Runs `c.steps` forward/backward pairs of `ref` (reference backend) and `fast` (another
/// backend's layer built with the same prototype, options and seed), with random parameters,
/// inputs (padding rows included) and output gradients, and compares everything: outputs,
/// input gradients, routing, choices, auxiliary loss, every parameter's gradient, the cache's
/// builds. `mem` moves tensors: `mem.upload(std::vector<T>)` returns an owner with data(), and
/// `mem.download(const T*, n)` returns a std::vector<T>. A device layer's host mirrors go up
/// with upload() and come back with download().
template <class Ref, class Fast, class Memory>
void check_agreement(Ref& ref, Fast& fast, Memory& mem, agreement_case c, std::uint64_t seed) {
  using T = typename Ref::value_type;
  constexpr std::size_t N = Ref::experts;
  const std::size_t din = ref.input_dim(), dout = ref.output_dim(), B = c.B, L = c.L;
  rng gen{seed};
  // random (not freshly initialised) parameters, so every path carries signal
  auto bank = ref.bank().values();
  for (std::size_t i = 0; i < bank.rows * bank.cols; ++i) bank.data[i] = static_cast<T>(0.3 * gen.normal());
  for (auto& v : ref.router().values()) v = static_cast<T>(0.5 * gen.normal());
  if (ref.strategy().strategy == strategy::soft_moe) {  // Φ and scale: the planner's, on the host
    for (auto& v : ref.soft_moe().values()) v = static_cast<T>(0.5 * gen.normal());
    std::ranges::copy(ref.soft_moe().values(), fast.soft_moe().values().begin());
  }
  std::copy_n(bank.data, bank.rows * bank.cols, fast.bank().values().data);
  std::copy(ref.router().values().begin(), ref.router().values().end(), fast.router().values().begin());
  if constexpr (requires { fast.upload(); }) fast.upload();
  ref.zero_grad();
  fast.zero_grad();
  ref.train(c.train);
  fast.train(c.train);
  ref.reseed(seed + 1);
  fast.reseed(seed + 1);
  if (c.task_routing) {
    std::vector<T> table(N * N);
    for (std::size_t t = 0; t < N; ++t) {
      T sum = 0;
      for (std::size_t e = 0; e < N; ++e) sum += table[t * N + e] = static_cast<T>(0.1 + gen.uniform());
      for (std::size_t e = 0; e < N; ++e) table[t * N + e] /= sum;
    }
    ref.set_task_routing({table.data(), N, N});
    fast.set_task_routing({table.data(), N, N});
  }

  const double tol = tolerance<T>() * std::sqrt(static_cast<double>(din + L * B + N));
  for (int step = 0; step < c.steps; ++step) {
    std::vector<std::int32_t> lengths;
    if (!c.full) {
      lengths.resize(B);
      for (auto& l : lengths) l = static_cast<std::int32_t>(1 + gen.below(L));
    }
    const auto x = random_vector<T>(B * L * din, gen);
    const auto dy = random_vector<T>(B * L * dout, gen);
    std::vector<std::int32_t> tags, ids;
    std::vector<std::uint64_t> example_ids;
    route_inputs in;
    if (c.tags) {
      const bool skills = ref.strategy().strategy == strategy::latent_skills;
      const std::size_t tasks = skills ? ref.strategy().tasks : N;
      for (std::size_t b = 0; b < B; ++b) tags.push_back(static_cast<std::int32_t>(gen.below(tasks)));
      in.tags = tags;
    }
    if (c.token_ids) {
      for (std::size_t i = 0; i < B * L; ++i) ids.push_back(static_cast<std::int32_t>(gen.below(1000)));
      in.token_ids = ids;
    } else {
      for (std::size_t b = 0; b < B; ++b) example_ids.push_back(gen());
      in.example_ids = example_ids;
    }
    auto xd = mem.upload(x);
    auto dyd = mem.upload(dy);
    auto yd = mem.upload(std::vector<T>(B * L * dout, T(7)));    // garbage the layer must overwrite
    auto dxd = mem.upload(std::vector<T>(B * L * din, T(-3)));
    std::vector<T> y0(dy.size()), dx0(x.size());
    ref.forward(make_tokens<const T>(x.data(), B, L, din, lengths), y0, in);
    fast.forward(make_tokens<const T>(xd.data(), B, L, din, lengths), {yd.data(), y0.size()}, in);
    std::vector<T> losses;
    if (c.losses)
      for (std::size_t b = 0; b < B; ++b) losses.push_back(static_cast<T>(1.0 + gen.uniform()));
    ref.backward(dy, dx0, losses);
    fast.backward({dyd.data(), dy.size()}, {dxd.data(), dx0.size()}, losses);
    if constexpr (requires { fast.download(); }) fast.download();
    const auto y1 = mem.download(yd.data(), y0.size());
    const auto dx1 = mem.download(dxd.data(), dx0.size());
    auto flat = [](auto m) { return std::vector<T>(m.data, m.data + m.rows * m.cols); };
    INFO("step " << step << ", B = " << B << ", L = " << L << ", N = " << N);
    CHECK(relative_error(flat(fast.routing()), flat(ref.routing())) < tol);
    const auto c0 = ref.choices(), c1 = fast.choices();
    CHECK(c1.rows == c0.rows);
    CHECK(c1.cols == c0.cols);
    CHECK(std::vector<std::int32_t>(c1.data, c1.data + c1.rows * c1.cols) ==
          std::vector<std::int32_t>(c0.data, c0.data + c0.rows * c0.cols));
    CHECK(std::abs(static_cast<double>(fast.auxiliary_loss() - ref.auxiliary_loss())) < tol);
    CHECK(relative_error(y1, y0) < tol);
    CHECK(relative_error(dx1, dx0) < tol);
    CHECK(relative_error(flat(fast.bank().gradients()), flat(ref.bank().gradients())) < tol);
    CHECK(relative_error(fast.router().gradients(), ref.router().gradients()) < tol);
    // the planner's own tensors (skills, a learned baseline) are host tensors on every backend
    auto ref_params = ref.parameters();
    for (const auto& fp : fast.parameters()) {
      if (fp.on_device) continue;  // the bank and the router, compared above through the mirrors
      const auto rp = std::ranges::find(ref_params, fp.name, &parameter<T>::name);
      REQUIRE(rp != ref_params.end());
      INFO(fp.name);
      CHECK(relative_error(fp.grad, rp->grad) < tol);
    }
    CHECK(fast.cache_builds() == ref.cache_builds());
    if (ref.strategy().strategy == strategy::cluster)  // planner state, on the host
      CHECK(relative_error(flat(fast.cluster_centres()), flat(ref.cluster_centres())) < tol);
    // the comparison is not vacuous: outputs and gradients carry signal
    double ymax = 0, gmax = 0;
    for (T v : y0) ymax = std::max(ymax, std::abs(static_cast<double>(v)));
    for (T v : ref.router().gradients()) gmax = std::max(gmax, std::abs(static_cast<double>(v)));
    CHECK(ymax > 1e-3);
    // (top-k with REINFORCE or DSelect-k sends no gradient to the router at inference, nor
    // does a fixed distribution per task)
    const bool estimated = ref.strategy().strategy == strategy::top_k &&
                           (ref.strategy().estimator == estimator::reinforce ||
                            ref.strategy().estimator == estimator::dselect);
    if (ref.uses_router() && (c.train || (!estimated && !c.task_routing))) CHECK(gmax > 1e-6);
    if (c.task_routing && !c.train) CHECK(ref.cache_builds() > 0);
    if (ref.strategy().strategy == strategy::latent_skills) {
      double smax = 0;
      for (T v : flat(ref.skills().gradients())) smax = std::max(smax, std::abs(static_cast<double>(v)));
      CHECK(smax > 1e-6);
    }
  }
}

}  // namespace smear::testing
