// After a warm-up call at a given shape, a layer's forward and backward allocate nothing: every
// global operator new (and, outside sanitizer builds, every malloc, which Eigen's GEMMs use for
// their packing buffers) is counted while they run (support/allocations.cpp).

#include <doctest/doctest.h>

#include <cstdlib>
#include <vector>

#include "smear/smear.hpp"
#include "support/allocations.hpp"

using smear::testing::count_allocations;
using smear::testing::steady_state_allocations;
using expert = smear::adapter<float>;

TEST_CASE("allocation counter: sees operator new" * doctest::description("the test below can fail")) {
  const std::size_t n = count_allocations([] {
    auto* v = new std::vector<int>(1000);
    delete v;
  });
  CHECK(n >= 1);
  if (smear::testing::counts_malloc()) {
    const std::size_t m = count_allocations([] {
      void* volatile p = std::malloc(1 << 20);
      std::free(p);
    });
    CHECK(m == 1);
  }
}

TEST_CASE("layer: forward + backward allocate nothing after a warm-up") {
  // Large enough that Eigen's GEMMs would put their packing buffers on the heap (over 128 KiB):
  // P = 2·256·32 + 32 = 16416, and the merge packs [N, P].
  constexpr std::size_t B = 4, L = 48, d = 256, m = 32;
  const std::vector<std::int32_t> lengths{48, 30, 1, 17};

  SUBCASE("smear, training, ragged lengths, expert dropout") {
    smear::layer<expert, 8> block{expert{d, m}, {.router = {.expert_dropout = 0.1}}, 3};
    CHECK(steady_state_allocations(block, B, L, lengths) == 0);
  }
  SUBCASE("smear, inference, full lengths") {
    smear::layer<expert, 8> block{expert{d, m}, {}, 4};
    block.train(false);
    CHECK(steady_state_allocations(block, B, L, {}) == 0);
  }
  SUBCASE("single adapter, one example") {
    smear::layer<expert, 1> block{expert{d, m}, {}, 5};
    CHECK(steady_state_allocations(block, 1, L, {}) == 0);
  }
  SUBCASE("every other strategy, training and inference") {
    for (const char* name : {"ensemble", "st_gumbel", "reinforce", "dselect", "switch", "tag", "hash", "adamix",
                             "latent_skills", "random", "cluster", "soft_moe"}) {
      smear::strategy_options routing = smear::parse_strategy(name);
      routing.tasks = 4;  // latent skills: one row per tag
      for (bool training : {true, false}) {
        CAPTURE(name);
        CAPTURE(training);
        smear::layer<expert, 8> block{expert{d, m}, {.routing = routing}, 6};
        block.train(training);
        CHECK(steady_state_allocations(block, B, L, lengths) == 0);
      }
    }
  }
  SUBCASE("smear inference through the merged-expert cache") {
    smear::layer<expert, 8> block{expert{d, m}, {}, 7};
    const std::vector<float> p(4 * 8, 1.0f / 8);
    block.set_task_routing(smear::matrix_ref<const float>{p.data(), 4, 8});
    block.train(false);
    CHECK(steady_state_allocations(block, B, L, lengths) == 0);
  }
}
