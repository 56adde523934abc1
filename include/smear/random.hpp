#pragma once
/// \file random.hpp
/// A small, portable random number generator (xoshiro256**, seeded through splitmix64), so a
/// fixed seed gives the same numbers with every compiler and standard library. Every sampling
/// call but normal() takes exactly one draw, so data-parallel replicas can skip the draws of
/// the other replicas' examples (smear/replicas.hpp).

#include <cmath>
#include <cstdint>
#include <numbers>

namespace smear {

/// Portable seeded generator; `normal()` and `uniform()` give the same sequence everywhere.
class rng {
 public:
  using result_type = std::uint64_t;

  explicit rng(std::uint64_t seed = 0) noexcept {
    for (auto& s : state_) {
      seed += 0x9E3779B97F4A7C15ull;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      s = z ^ (z >> 31);
    }
  }

  static constexpr result_type min() noexcept { return 0; }
  static constexpr result_type max() noexcept { return ~result_type{0}; }

  result_type operator()() noexcept {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  /// Uniform in [0, 1), 53 random bits.
  double uniform() noexcept { return static_cast<double>((*this)() >> 11) * 0x1.0p-53; }

  /// Uniform in (0, 1): uniform(), with the one value 0 (probability 2⁻⁵³) moved to 2⁻⁵⁴, so
  /// that, unlike a rejection loop, it always takes exactly one draw.
  double uniform_positive() noexcept {
    const double u = uniform();
    return u > 0.0 ? u : 0x1.0p-54;
  }

  /// Skips the next n draws (what n calls of operator() would take).
  void discard(std::uint64_t n) noexcept {
    for (; n > 0; --n) (*this)();
  }

  /// Uniform integer in [0, n).
  std::uint64_t below(std::uint64_t n) noexcept {
    return static_cast<std::uint64_t>(uniform() * static_cast<double>(n)) % n;
  }

  /// Standard normal (Box–Muller, one value per call).
  double normal() noexcept {
    double u = uniform();
    while (u <= 0.0) u = uniform();
    const double v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * std::numbers::pi * v);
  }

  /// Standard Gumbel sample: -log(-log(u)), one draw.
  double gumbel() noexcept { return -std::log(-std::log(uniform_positive())); }

 private:
  static constexpr std::uint64_t rotl(std::uint64_t x, int k) noexcept {
    return (x << k) | (x >> (64 - k));
  }
  std::uint64_t state_[4];
};

}  // namespace smear
