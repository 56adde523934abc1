#pragma once
// What the data-parallel tests share: a global batch every process builds alike, and one
// training step of a layer on a shard of it.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <smear/smear.hpp>
#include <smear/testing.hpp>

namespace smear::testing {

/// One global batch of `size` examples of L tokens of width d: inputs, lengths, tags (0..2)
/// and loss weights, the same on every process for a seed.
template <class T>
struct global_batch {
  std::size_t size, L, d;
  std::vector<T> x, w;
  std::vector<std::int32_t> lengths, tags;
  global_batch(std::size_t B, std::size_t length, std::size_t dim, std::uint64_t seed) : size(B), L(length), d(dim) {
    rng gen{seed};
    x = random_vector<T>(B * L * d, gen);
    w = random_vector<T>(B * L * d, gen);
    for (std::size_t b = 0; b < B; ++b) {
      lengths.push_back(static_cast<std::int32_t>(1 + gen.below(L)));
      tags.push_back(static_cast<std::int32_t>(gen.below(3)));
    }
  }
};

/// One training step of `block` on examples [first, first + B) of `g`: forward, each example's
/// loss ℓ_b = Σ w_b ⊙ y_b, backward of their mean over the B examples. Returns the auxiliary loss.
template <class Layer, class T = typename Layer::value_type>
T shard_step(Layer& block, const global_batch<T>& g, std::size_t first, std::size_t B, bool tags = false) {
  const std::size_t row = g.L * g.d;
  const tokens<const T> x{g.x.data() + first * row, B, g.L, g.d, std::span(g.lengths).subspan(first, B)};
  std::vector<T> y(B * row), dy(B * row), dx(B * row), losses(B);
  route_inputs in;
  if (tags) in.tags = std::span(g.tags).subspan(first, B);
  block.forward(x, y, in);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t i = 0; i < row; ++i) {
      losses[b] += g.w[(first + b) * row + i] * y[b * row + i];
      dy[b * row + i] = g.w[(first + b) * row + i] / static_cast<T>(B);
    }
  block.backward(dy, dx, losses);
  return block.auxiliary_loss();
}

}  // namespace smear::testing
