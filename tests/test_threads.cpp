// The cpu backend's thread pool and thread counts: parallel_for's split, exceptions, nested and
// concurrent calls, thread_limit scopes, and a layer's thread count (layer_options::threads),
// whose results depend on the count and not on who ran what. The test programs run with
// SMEAR_NUM_THREADS=3 (more threads than this machine may have cores: a busy pool).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <stdexcept>
#include <thread>
#include <vector>

#include <smear/smear.hpp>

#include "support/testing.hpp"

using namespace smear;
namespace be = smear::backend;

namespace {

/// Which chunk ran each index, through parallel_for on the cpu backend.
std::vector<std::size_t> chunk_of_each(std::size_t n) {
  std::vector<std::size_t> chunk(n, std::size_t(-1));
  std::vector<std::atomic<int>> seen(n);
  be::parallel_for(be::cpu{}, n, [&](std::size_t i, std::size_t c) {
    chunk[i] = c;
    ++seen[i];
  });
  for (std::size_t i = 0; i < n; ++i) REQUIRE(seen[i].load() == 1);
  return chunk;
}

}  // namespace

TEST_CASE("thread pool: parallel_for runs every index once, in contiguous chunks fixed by the thread count") {
  REQUIRE_MESSAGE(be::thread_pool::shared().size() >= 3, "run with SMEAR_NUM_THREADS=3");
  for (std::size_t threads : {1, 2, 3}) {
    const be::thread_limit limit(threads);
    REQUIRE(be::max_threads(be::cpu{}) == threads);
    for (std::size_t n : {0, 1, 2, 3, 7, 64, 1001}) {
      const auto chunk = chunk_of_each(n);
      const std::size_t chunks = std::min(n, threads);
      // chunk c is [n·c/chunks, n·(c+1)/chunks)
      std::vector<std::size_t> expected(n, 0);
      for (std::size_t c = 0; c < chunks; ++c)
        for (std::size_t i = n * c / chunks; i < n * (c + 1) / chunks; ++i) expected[i] = c;
      CHECK(chunk == expected);
      for (int again = 0; again < 3; ++again) CHECK(chunk_of_each(n) == chunk);
    }
  }
}

TEST_CASE("thread pool: the first exception of a chunk reaches the caller, and the pool goes on") {
  const be::thread_limit limit(3);
  std::atomic<int> ran{0};
  CHECK_THROWS_AS(be::parallel_for(be::cpu{}, 30,
                                   [&](std::size_t i, std::size_t) {
                                     ++ran;
                                     if (i == 17) throw std::runtime_error("chunk failed");
                                   }),
                  std::runtime_error);
  CHECK(ran.load() >= 18);
  const auto chunk = chunk_of_each(30);  // still works
  CHECK(chunk.back() == 2);
}

TEST_CASE("thread pool: a nested call runs inline, and concurrent callers each get all their work done") {
  const be::thread_limit limit(3);
  std::vector<std::atomic<int>> seen(12 * 40);
  be::parallel_for(be::cpu{}, 12, [&](std::size_t i, std::size_t) {
    CHECK(be::max_threads(be::cpu{}) == 1);  // inside a job
    be::parallel_for(be::cpu{}, 40, [&](std::size_t j, std::size_t c) {
      CHECK(c == 0);
      ++seen[i * 40 + j];
    });
  });
  for (auto& s : seen) CHECK(s.load() == 1);

  // four threads of the program share the pool: whoever finds it busy runs its own chunks
  constexpr std::size_t callers = 4, n = 500, rounds = 50;
  std::vector<std::vector<std::size_t>> got(callers);
  {
    std::vector<std::jthread> threads;
    for (std::size_t t = 0; t < callers; ++t)
      threads.emplace_back([&, t] {
        std::vector<std::size_t> sum(n, 0);
        for (std::size_t r = 0; r < rounds; ++r)
          be::parallel_for(be::cpu{}, n, [&](std::size_t i, std::size_t) { sum[i] += i + t; });
        got[t] = sum;
      });
  }
  for (std::size_t t = 0; t < callers; ++t)
    for (std::size_t i = 0; i < n; ++i) CHECK(got[t][i] == rounds * (i + t));
}

TEST_CASE("thread pool: thread_limit scopes nest, the smallest winning, and are undone") {
  const std::size_t pool = be::thread_pool::shared().size();
  CHECK(be::max_threads(be::cpu{}) == pool);
  {
    const be::thread_limit two(2);
    CHECK(be::max_threads(be::cpu{}) == std::min<std::size_t>(2, pool));
    {
      const be::thread_limit more(pool + 5);  // a larger limit does not raise it
      CHECK(be::max_threads(be::cpu{}) == std::min<std::size_t>(2, pool));
      const be::thread_limit one(1);
      CHECK(be::max_threads(be::cpu{}) == 1);
    }
    CHECK(be::max_threads(be::cpu{}) == std::min<std::size_t>(2, pool));
  }
  CHECK(be::max_threads(be::cpu{}) == pool);
  const be::thread_limit none(0);
  CHECK(be::max_threads(be::cpu{}) == pool);
}

TEST_CASE("thread pool: a private pool runs jobs and stops cleanly") {
  for (std::size_t size : {1, 2, 5}) {
    be::thread_pool pool(size);
    CHECK(pool.size() == size);
    std::vector<std::atomic<int>> seen(9);
    auto task = [&](std::size_t c) {
      CHECK(be::max_threads(be::cpu{}) == 1);  // as inside a job, whoever runs it
      ++seen[c];
    };
    CHECK(pool.run(seen.size(), task) == (size > 1));  // a pool of one: the caller runs all
    for (auto& s : seen) CHECK(s.load() == 1);
  }
}

TEST_CASE("a layer's thread count: same results for a count whoever runs, and a backward after a narrower forward") {
  using E = adapter<double>;
  constexpr std::size_t N = 4, d = 64, B = 8, L = 32;
  rng gen{5};
  std::vector<double> x(B * L * d), dy(B * L * d);
  for (auto& v : x) v = gen.normal();
  for (auto& v : dy) v = gen.normal();
  std::vector<std::int32_t> lengths(B, static_cast<std::int32_t>(L));
  lengths[3] = 5;
  const auto xt = make_tokens<const double>(x.data(), B, L, d, lengths);
  for (strategy s : {strategy::smear, strategy::top_k}) {
    CAPTURE(static_cast<int>(s));
    std::vector<std::vector<double>> ys, dxs, grads;
    for (std::size_t threads : {1, 3, 3, 0}) {
      layer<E, N> block(E{d, 16}, layer_options{.routing = {.strategy = s, .k = s == strategy::top_k ? 2u : 1u}, .threads = threads}, 3);
      rng init{9};
      testing::randomise(block, init);
      std::vector<double> y(B * L * d), dx(B * L * d);
      block.forward(xt, y);
      {
        // a caller's wider scope cannot widen the backward past the forward's buffers
        const be::thread_limit wider(0);
        block.backward(dy, dx);
      }
      std::vector<double> g;
      for (auto& p : block.parameters()) g.insert(g.end(), p.grad.begin(), p.grad.end());
      ys.push_back(y);
      dxs.push_back(dx);
      grads.push_back(g);
    }
    CHECK(ys[1] == ys[2]);  // the same count twice: bit for bit
    CHECK(dxs[1] == dxs[2]);
    CHECK(grads[1] == grads[2]);
    for (std::size_t i : {1, 3}) {  // other counts: the same up to rounding
      CHECK(testing::relative_error(ys[i], ys[0]) < 1e-12);
      CHECK(testing::relative_error(dxs[i], dxs[0]) < 1e-12);
      CHECK(testing::relative_error(grads[i], grads[0]) < 1e-12);
    }
  }
}

TEST_CASE("a layer's backward under a narrower scope than its forward") {
  // the forwards size their per-thread buffers for 3 threads; one backward then uses fewer
  using E = adapter<double>;
  constexpr std::size_t N = 4, d = 64, B = 8, L = 32;
  rng gen{4};
  std::vector<double> x(B * L * d), dy(B * L * d), y(B * L * d), dx(B * L * d), dx1(B * L * d);
  for (auto& v : x) v = gen.normal();
  for (auto& v : dy) v = gen.normal();
  const auto xt = make_tokens<const double>(x.data(), B, L, d, {});
  for (strategy s : {strategy::smear, strategy::top_k, strategy::ensemble}) {
    CAPTURE(static_cast<int>(s));
    const layer_options o{.routing = {.strategy = s, .k = s == strategy::top_k ? 2u : 1u}};
    layer<E, N> a(E{d, 16}, o, 3), b(E{d, 16}, o, 3);
    a.forward(xt, y);
    a.backward(dy, dx);
    b.forward(xt, y);
    {
      const be::thread_limit one(1);
      b.backward(dy, dx1);
    }
    CHECK(testing::relative_error(dx1, dx) < 1e-12);
    auto pa = a.parameters(), pb = b.parameters();
    for (std::size_t i = 0; i < pa.size(); ++i) {
      CAPTURE(pa[i].name);
      CHECK(testing::relative_error(pb[i].grad, pa[i].grad) < 1e-12);
    }
  }
}
