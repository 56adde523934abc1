#pragma once
/// \file routing/hash.hpp
/// Hash routing: the expert of an example is a fixed, seeded hash of its token ids (or of its
/// example id, or of its position in the batch), stable across runs, platforms and compilers.

#include <cstddef>
#include <cstdint>
#include <span>

#include "smear/routing/planner.hpp"
#include "smear/routing/tag.hpp"

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

namespace smear {

template <class T>
class hash_planner : public planner_base<hash_planner<T>, T> {
 public:
  hash_planner(std::size_t experts, std::size_t parameters, std::uint64_t seed)
      : n_(experts), p_(parameters), seed_(seed) {}

  void check(const route_context<T>& c, const char* op) const override {
    if (!c.in.token_ids.empty() && c.in.token_ids.size() != c.batch * c.length)
      throw shape_error(detail::message(op, ": token_ids has ", c.in.token_ids.size(),
                                        " values, expected [B, L] = ", detail::shape(c.batch, c.length)));
    if (c.in.token_ids.empty() && !c.in.example_ids.empty() && c.in.example_ids.size() != c.batch)
      throw shape_error(detail::message(op, ": example_ids has ", c.in.example_ids.size(),
                                        " values, expected B = ", c.batch));
  }
  router_use router(const route_context<T>&) const override { return router_use::none; }
  void plan(const route_context<T>& c, rng&, routing_plan<T>& out) override {
    plan_one_expert_each(out, c.batch, n_, p_, [&](std::size_t b) {
      const std::uint64_t h = !c.in.token_ids.empty()
                                  ? detail::hash_tokens(c.in.token_ids.subspan(b * c.length, c.valid(b)), seed_)
                                  : detail::hash_id(c.in.example_ids.empty() ? b : c.in.example_ids[b], seed_);
      return static_cast<std::size_t>(h % n_);
    });
  }

 private:
  std::size_t n_, p_;
  std::uint64_t seed_;
};

}  // namespace smear
