#pragma once
// Counting allocations (tests/support/allocations.cpp replaces the global allocation
// functions), and the steady-state check every layer must pass: after a warm-up call at a
// given shape, forward and backward allocate nothing.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "smear/random.hpp"
#include "smear/routing/strategy.hpp"
#include "smear/tensor.hpp"
#include "smear/testing.hpp"

namespace smear::testing {

/// Allocations (operator new, and malloc where counts_malloc()) made while `f` runs.
std::size_t count_allocations(const std::function<void()>& f);

/// Whether malloc is counted too (not under AddressSanitizer, which owns malloc).
bool counts_malloc() noexcept;

/// Forward then backward of `block` on a fixed batch, three times; returns the allocations.
/// Every example gets a tag and a loss, for the strategies that read them.
template <class Layer>
std::size_t steady_state_allocations(Layer& block, std::size_t B, std::size_t L,
                                     std::span<const std::int32_t> lengths) {
  smear::rng gen{7};
  const std::size_t d = block.input_dim();
  const auto x = random_vector<float>(B * L * d, gen);
  const auto dy = random_vector<float>(B * L * d, gen);
  const auto losses = random_vector<float>(B, gen);
  std::vector<std::int32_t> tags(B);
  for (std::size_t b = 0; b < B; ++b) tags[b] = static_cast<std::int32_t>(b % 4);
  std::vector<float> y(x.size()), dx(x.size());
  const auto tokens = smear::make_tokens<const float>(x.data(), B, L, d, lengths);
  const smear::route_inputs route{.tags = tags};
  auto step = [&] {
    block.forward(tokens, y, route);
    if (block.training()) block.backward(dy, dx, losses);
  };
  step();  // warm-up: buffers (and the thread pool) are set up here
  return count_allocations([&] {
    for (int i = 0; i < 3; ++i) step();
  });
}

}  // namespace smear::testing
