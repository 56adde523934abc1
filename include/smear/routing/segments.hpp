#pragma once
/// \file routing/segments.hpp
/// Causal segment routing's routing units: a batch [B, L, d] seen as B·S units of ℓ tokens
/// (S = L / ℓ), unit b·S + s holding tokens s·ℓ … (s + 1)·ℓ − 1 of example b. The memory is the
/// batch's own: [B, L, d] and [B·S, ℓ, d] are the same values.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "smear/tensor.hpp"

namespace smear {

/// The routing units of `x` for segments of `segment` tokens (x itself when segment is 0; L
/// must be a multiple of it, which the layers check). Each unit's valid tokens are its
/// example's within the segment, 0 past the example's end; they go to `lengths`, which stays
/// empty when x has no lengths (every token valid).
template <class V>
tokens<V> segment_units(tokens<V> x, std::size_t segment, std::vector<std::int32_t>& lengths) {
  if (segment == 0 || x.length == 0) return x;
  const std::size_t S = x.length / segment;
  lengths.clear();
  if (!x.lengths.empty()) {
    lengths.resize(x.batch * S);
    for (std::size_t b = 0; b < x.batch; ++b)
      for (std::size_t s = 0; s < S; ++s) {
        const std::size_t valid = x.valid(b), start = s * segment;
        lengths[b * S + s] = static_cast<std::int32_t>(valid > start ? std::min(valid - start, segment) : 0);
      }
  }
  return {x.data, x.batch * S, segment, x.dim,
          x.lengths.empty() ? std::span<const std::int32_t>{} : std::span<const std::int32_t>(lengths)};
}

/// Each of `per_example`'s values repeated for the `S` units of its example, into `out`
/// (empty stays empty).
template <class V>
std::span<const V> repeat_per_unit(std::span<const V> per_example, std::size_t S, std::vector<V>& out) {
  if (S == 1 || per_example.empty()) return per_example;
  out.resize(per_example.size() * S);
  for (std::size_t b = 0; b < per_example.size(); ++b) std::fill_n(out.data() + b * S, S, per_example[b]);
  return out;
}

}  // namespace smear
