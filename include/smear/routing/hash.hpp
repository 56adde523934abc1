#pragma once
/// \file routing/hash.hpp
/// The fixed, seeded hash behind hash routing: stable across runs, platforms and compilers.

#include <cstdint>
#include <span>

namespace smear::detail {

/// splitmix64's finaliser: a bijective mix of 64 bits.
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Hash of a sequence of token ids under `seed`.
inline std::uint64_t hash_tokens(std::span<const std::int32_t> ids, std::uint64_t seed) noexcept {
  std::uint64_t h = mix64(seed ^ 0x68617368ull);
  for (auto id : ids) h = mix64(h ^ static_cast<std::uint32_t>(id));
  return mix64(h ^ ids.size());
}

/// Hash of an example id under `seed`.
constexpr std::uint64_t hash_id(std::uint64_t id, std::uint64_t seed) noexcept {
  return mix64(mix64(seed ^ 0x68617368ull) ^ id);
}

}  // namespace smear::detail
