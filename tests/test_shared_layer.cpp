// One layer in evaluation mode shared by many threads, each with its own workspace: every
// output equals the serial forward's bit for bit, across strategies (merge by router, the
// inference cache, gathers, mixtures, pooled-input routing) and batch shapes. Built twice: in
// smear_tests and as smear_thread_tests under ThreadSanitizer.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <smear/smear.hpp>

using namespace smear;

namespace {

using E = adapter<float>;
constexpr std::size_t experts = 4, dim = 16;
using block = layer<E, experts>;

/// One batch: inputs, lengths, tags, ids.
struct batch {
  std::size_t B = 0, L = 0;
  std::vector<float> x;
  std::vector<std::int32_t> lengths, tags;
  std::vector<std::uint64_t> ids;
  tokens<const float> tokens_view() const { return make_tokens<const float>(x.data(), B, L, dim, lengths); }
  route_inputs inputs() const { return {.tags = tags, .example_ids = ids}; }
};

batch make_batch(std::size_t B, std::size_t L, std::uint64_t seed) {
  batch b;
  b.B = B;
  b.L = L;
  rng gen{seed};
  b.x.resize(B * L * dim);
  for (auto& v : b.x) v = static_cast<float>(gen.normal());
  for (std::size_t i = 0; i < B; ++i) {
    b.lengths.push_back(static_cast<std::int32_t>(1 + gen.below(L)));
    b.tags.push_back(static_cast<std::int32_t>(gen.below(3)));
    b.ids.push_back(gen());
  }
  return b;
}

struct case_ {
  std::string name;
  std::unique_ptr<block> layer;
};

std::vector<case_> make_cases() {
  std::vector<case_> out;
  auto add = [&](std::string name, strategy_options s) {
    out.push_back({std::move(name), std::make_unique<block>(E{dim, 4}, layer_options{.routing = s}, 11)});
  };
  add("smear", {});
  add("smear with task routing", {});
  add("latent_skills", {.strategy = strategy::latent_skills, .tasks = 3});
  add("adamix", {.strategy = strategy::adamix});
  add("ensemble", {.strategy = strategy::ensemble});
  add("top_k", {.strategy = strategy::top_k, .k = 2});
  add("dselect", {.strategy = strategy::top_k, .estimator = estimator::dselect});
  add("switch", {.strategy = strategy::top_k, .k = 2, .estimator = estimator::switch_gate});
  add("reinforce", {.strategy = strategy::top_k, .estimator = estimator::reinforce});
  add("tag", {.strategy = strategy::tag});
  add("hash", {.strategy = strategy::hash});
  add("cluster", {.strategy = strategy::cluster});
  add("soft_moe", {.strategy = strategy::soft_moe, .soft_slots = 2});
  const std::vector<float> p{0.7f, 0.1f, 0.1f, 0.1f, 0.f, 0.5f, 0.5f, 0.f, 0.25f, 0.25f, 0.25f, 0.25f};
  out[1].layer->set_task_routing(matrix_ref<const float>{p.data(), 3, experts});
  for (auto& c : out) c.layer->train(false);
  return out;
}

}  // namespace

TEST_CASE("a shared evaluation layer: concurrent forwards with one workspace per thread equal serial ones") {
  auto cases = make_cases();
  std::vector<batch> batches;
  const std::size_t shapes[][2] = {{1, 1}, {3, 5}, {8, 16}, {2, 33}, {5, 7}};
  for (std::size_t i = 0; i < std::size(shapes); ++i) batches.push_back(make_batch(shapes[i][0], shapes[i][1], 100 + i));

  // expected outputs from the layers' own (non-const) forward
  std::vector<std::vector<std::vector<float>>> expected(cases.size());
  for (std::size_t c = 0; c < cases.size(); ++c)
    for (const auto& b : batches) {
      std::vector<float> y(b.B * b.L * dim);
      cases[c].layer->forward(b.tokens_view(), y, b.inputs());
      expected[c].push_back(std::move(y));
    }
  std::vector<std::size_t> builds;
  for (const auto& c : cases) builds.push_back(c.layer->cache_builds());
  for (auto& c : cases) c.layer->invalidate_cache();  // the threads race to rebuild it

  constexpr std::size_t threads = 8, rounds = 6;
  std::atomic<std::size_t> mismatches{0}, calls{0};
  std::vector<std::string> first_error(threads);
  {
    std::vector<std::jthread> pool;
    for (std::size_t t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        block::workspace ws;
        std::vector<float> y;
        try {
          for (std::size_t r = 0; r < rounds; ++r)
            for (std::size_t k = 0; k < cases.size() * batches.size(); ++k) {
              // each thread walks the cases and shapes in its own order
              const std::size_t i = (k * (2 * t + 1) + t + r) % (cases.size() * batches.size());
              const std::size_t c = i / batches.size(), s = i % batches.size();
              const block& shared = *cases[c].layer;
              const batch& b = batches[s];
              y.assign(b.B * b.L * dim, -1.f);
              shared.forward(ws, b.tokens_view(), y, b.inputs());
              ++calls;
              if (y != expected[c][s]) {
                ++mismatches;
                first_error[t] = cases[c].name + " at shape " + std::to_string(s);
              }
            }
        } catch (const std::exception& e) {
          ++mismatches;
          first_error[t] = e.what();
        }
      });
  }
  for (const auto& e : first_error) CHECK_MESSAGE(e.empty(), e);
  CHECK(mismatches == 0);
  CHECK(calls == threads * rounds * cases.size() * batches.size());
  // the inference cache was rebuilt once per cached layer, however many threads wanted it
  for (std::size_t c = 0; c < cases.size(); ++c) {
    const std::size_t rebuilt = cases[c].layer->cache_builds() - builds[c];
    CHECK_MESSAGE(rebuilt == (builds[c] > 0 ? 1u : 0u), cases[c].name);
  }
}

TEST_CASE("a workspace follows its layer: new parameters, another layer, a refused call") {
  auto cases = make_cases();
  block& a = *cases[2].layer;  // latent skills: a planner with parameters, through the cache
  const block& b = *cases[0].layer;
  const batch x = make_batch(3, 4, 7);
  std::vector<float> y(x.B * x.L * dim), serial(y.size());
  block::workspace ws;
  a.forward(ws, x.tokens_view(), y, x.inputs());
  // new skill logits and bank values: the workspace's copy of the planner and the cache renew
  for (auto& v : std::span(a.skills().logits().data, 3 * experts)) v += 0.5f;
  a.bank().values()(1, 3) += 0.25f;
  a.forward(ws, x.tokens_view(), y, x.inputs());
  a.forward(x.tokens_view(), serial, x.inputs());
  CHECK(y == serial);
  // the same workspace serves another layer
  b.forward(ws, x.tokens_view(), y, x.inputs());
  cases[0].layer->forward(x.tokens_view(), serial, x.inputs());
  CHECK(y == serial);
  CHECK(ws.routing().rows == x.B);
  CHECK(ws.choices().rows == x.B);
  // training mode refuses the shared forward
  cases[0].layer->train(true);
  CHECK_THROWS_AS(b.forward(ws, x.tokens_view(), y, x.inputs()), state_error);
}
