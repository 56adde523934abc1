// After a warm-up call at a given shape, a layer's forward and backward allocate nothing: every
// global operator new (and, outside sanitizer builds, every malloc, which Eigen's GEMMs use for
// their packing buffers) is counted while they run.

#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "smear/smear.hpp"
#include "support/testing.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define SMEAR_TEST_COUNT_MALLOC 0  // the sanitizer owns malloc; count operator new only
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SMEAR_TEST_COUNT_MALLOC 0
#endif
#endif
#if !defined(SMEAR_TEST_COUNT_MALLOC) && defined(__GLIBC__)
#define SMEAR_TEST_COUNT_MALLOC 1
#endif
#ifndef SMEAR_TEST_COUNT_MALLOC
#define SMEAR_TEST_COUNT_MALLOC 0
#endif

namespace {
std::atomic<bool> counting{false};
std::atomic<std::size_t> allocations{0};

void note_allocation() noexcept {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}

void* allocate(std::size_t n, std::size_t align) {
  note_allocation();
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                              : std::malloc(n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

/// Out of line, so the compiler does not see operator new's memory reach std::free (which is
/// how replacement operators are written) and warn about a mismatch.
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }

/// Allocations made while `f` runs.
template <class F>
std::size_t count_allocations(F&& f) {
  allocations = 0;
  counting = true;
  f();
  counting = false;
  return allocations.load();
}
}  // namespace

// Every replaceable form of global new and delete.
void* operator new(std::size_t n) { return allocate(n, 0); }
void* operator new[](std::size_t n) { return allocate(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return allocate(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return allocate(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return allocate(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }

#if SMEAR_TEST_COUNT_MALLOC
// glibc lets a program replace malloc and its relatives; these count and forward to glibc's own.
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) {
  note_allocation();
  return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) {
  note_allocation();
  return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) {
  note_allocation();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t align, std::size_t n) {
  note_allocation();
  return __libc_memalign(align, n);
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  note_allocation();
  return __libc_memalign(align, n);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  note_allocation();
  void* p = __libc_memalign(align, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) { __libc_free(p); }
}
#endif

namespace {

using expert = smear::adapter<float>;

/// Forward then backward of `block` on a fixed batch, three times; returns the allocations.
/// Every example gets a tag and a loss, for the strategies that read them.
template <class Layer>
std::size_t steady_state_allocations(Layer& block, std::size_t B, std::size_t L,
                                     std::span<const std::int32_t> lengths) {
  smear::rng gen{7};
  const std::size_t d = block.input_dim();
  const auto x = smear::testing::random_vector<float>(B * L * d, gen);
  const auto dy = smear::testing::random_vector<float>(B * L * d, gen);
  const auto losses = smear::testing::random_vector<float>(B, gen);
  std::vector<std::int32_t> tags(B);
  for (std::size_t b = 0; b < B; ++b) tags[b] = static_cast<std::int32_t>(b % 4);
  std::vector<float> y(x.size()), dx(x.size());
  const auto tokens = smear::make_tokens<const float>(x.data(), B, L, d, lengths);
  const smear::route_inputs route{.tags = tags};
  auto step = [&] {
    block.forward(tokens, y, route);
    if (block.training()) block.backward(dy, dx, losses);
  };
  step();  // warm-up: buffers (and the OpenMP thread pool) are set up here
  return count_allocations([&] {
    for (int i = 0; i < 3; ++i) step();
  });
}

}  // namespace

TEST_CASE("allocation counter: sees operator new" * doctest::description("the test below can fail")) {
  const std::size_t n = count_allocations([] {
    auto* v = new std::vector<int>(1000);
    delete v;
  });
  CHECK(n >= 1);
#if SMEAR_TEST_COUNT_MALLOC
  const std::size_t m = count_allocations([] {
    void* volatile p = std::malloc(1 << 20);
    std::free(p);
  });
  CHECK(m == 1);
#endif
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
                             "latent_skills"}) {
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
