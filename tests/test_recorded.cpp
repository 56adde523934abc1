// Recorded results: for a fixed seed, every strategy's outputs, input gradients, routing,
// choices, auxiliary loss and parameter gradients on the reference backend, over two training
// steps and one evaluation step, hashed bit for bit. The table in recorded_cases.hpp was written
// by the code before the routing plan existed; a change that alters any number fails here.
// SMEAR_RECORD=<file> writes the table anew instead of comparing (only for a deliberate change
// of the numbers, stated in the commit).

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <smear/smear.hpp>
#include <string>
#include <vector>

#include "support/testing.hpp"

using namespace smear;

namespace {

/// FNV-1a over the bytes of a range of trivially copyable values.
template <class V>
std::uint64_t fnv(std::uint64_t h, const V* p, std::size_t n) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n * sizeof(V); ++i) h = (h ^ bytes[i]) * 0x100000001B3ull;
  return h;
}
constexpr std::uint64_t fnv_basis = 0xCBF29CE484222325ull;

struct recorded {
  const char* name;
  std::uint64_t hash;
};

#include "recorded_cases.hpp"

/// One line per step: name/step/tensor -> hash.
template <class Layer>
void run_case(const std::string& name, Layer& block, std::map<std::string, std::uint64_t>& out,
              bool tags = false, bool token_ids = false, std::size_t tasks = 0) {
  using T = typename Layer::value_type;
  constexpr std::size_t N = Layer::experts;
  constexpr std::size_t B = 4, L = 5;
  rng gen{1234};
  for (auto& p : block.parameters())
    for (auto& v : p.value) v = static_cast<T>(0.4 * gen.normal());
  block.invalidate_cache();
  const std::size_t din = block.input_dim(), dout = block.output_dim();
  const std::vector<std::int32_t> lengths{5, 2, 4, 3};
  for (int step = 0; step < 3; ++step) {
    block.train(step < 2);
    const auto x = testing::random_vector<T>(B * L * din, gen);
    const auto dy = testing::random_vector<T>(B * L * dout, gen);
    std::vector<T> losses(B);
    for (auto& l : losses) l = static_cast<T>(1.0 + gen.uniform());
    std::vector<std::int32_t> tag(B), ids(B * L);
    for (auto& t : tag) t = static_cast<std::int32_t>(gen.below(tasks ? tasks : N));
    for (auto& i : ids) i = static_cast<std::int32_t>(gen.below(1000));
    route_inputs in;
    if (tags) in.tags = tag;
    if (token_ids) in.token_ids = ids;
    std::vector<T> y(B * L * dout), dx(x.size());
    block.forward(make_tokens<const T>(x.data(), B, L, din, lengths), y, in);
    block.backward(dy, dx, losses);
    const std::string key = name + "/" + std::to_string(step) + "/";
    out[key + "y"] = fnv(fnv_basis, y.data(), y.size());
    out[key + "dx"] = fnv(fnv_basis, dx.data(), dx.size());
    const auto r = block.routing();
    out[key + "routing"] = fnv(fnv_basis, r.data, r.rows * r.cols);
    const auto c = block.choices();
    out[key + "choices"] = fnv(fnv_basis, c.data, c.rows * c.cols);
    const T aux = block.auxiliary_loss();
    out[key + "aux"] = fnv(fnv_basis, &aux, 1);
    std::uint64_t g = fnv_basis;
    for (auto& p : block.parameters()) g = fnv(g, p.grad.data(), p.grad.size());
    out[key + "grads"] = g;
  }
}

std::map<std::string, std::uint64_t> run_all() {
  std::map<std::string, std::uint64_t> out;
  using A = adapter<double>;
  const A proto{6, 3};
  auto one = [&](const std::string& name, layer_options o, bool tags = false, bool token_ids = false) {
    layer<A, 4, backend::reference> block{proto, o, 77};
    run_case(name, block, out, tags, token_ids, o.routing.tasks);
  };
  auto top = [](estimator e, std::size_t k = 1) {
    return strategy_options{.strategy = strategy::top_k, .k = k, .estimator = e};
  };
  one("smear", {});
  one("smear_dropout_mean_nolayernorm",
      {.router = {.pool = pooling::mean, .layer_norm = false, .temperature = 0.7, .expert_dropout = 0.3}});
  one("smear_detached_noresidual", {.router = {.detach_input = true}, .residual = false});
  one("ensemble_dropout", {.router = {.expert_dropout = 0.3}, .routing = {.strategy = strategy::ensemble}});
  one("st_gumbel", {.routing = top(estimator::st_gumbel)});
  one("st_gumbel_k2", {.router = {.temperature = 0.5}, .routing = top(estimator::st_gumbel, 2)});
  auto rf = top(estimator::reinforce);
  rf.entropy_bonus = 0.1;
  one("reinforce_average", {.routing = rf});
  rf.baseline = baseline::learned;
  one("reinforce_learned", {.routing = rf});
  auto ds = top(estimator::dselect);
  ds.dselect_entropy = 0.1;
  one("dselect", {.routing = ds});
  one("tag", {.routing = {.strategy = strategy::tag}}, true);
  one("hash_tokens", {.routing = {.strategy = strategy::hash, .hash_seed = 9}}, false, true);
  one("hash_examples", {.routing = {.strategy = strategy::hash}});
  one("adamix", {.routing = {.strategy = strategy::adamix}});
  one("latent_skills", {.routing = {.strategy = strategy::latent_skills, .tasks = 3}}, true);
  {
    layer<A, 3, backend::reference> block{proto, {.routing = ds}, 78};  // unused codes
    run_case("dselect_n3", block, out);
  }
  {
    layer<A, 4, backend::reference> block{proto, {}, 79};
    const std::vector<double> p{0.1, 0.2, 0.3, 0.4, 1, 0, 0, 0, 0.25, 0.25, 0.25, 0.25, 0, 0, 0.5, 0.5};
    block.set_task_routing({p.data(), 4, 4});
    run_case("smear_task_routing", block, out, true);
  }
  {
    layer<A, 1, backend::reference> block{proto, {}, 80};
    run_case("single", block, out);
  }
  {
    layer<adapter<float>, 4, backend::reference> block{adapter<float>{6, 3, {.up_bias = true}}, {}, 81};
    run_case("smear_float", block, out);
  }
  {
    layer<lora<double>, 3, backend::reference> block{lora<double>{5, 4, 2}, {.routing = {.strategy = strategy::ensemble}}, 82};
    run_case("ensemble_lora", block, out);
  }
  return out;
}

}  // namespace

TEST_CASE("recorded results: the reference backend's numbers are bit-identical to the recorded ones") {
  const auto now = run_all();
  if (const char* path = std::getenv("SMEAR_RECORD")) {
    std::FILE* f = std::fopen(path, "w");
    REQUIRE(f != nullptr);
    std::fprintf(f, "// Written by tests/test_recorded.cpp with SMEAR_RECORD set; see that file.\n");
    std::fprintf(f, "constexpr recorded recorded_cases[] = {\n");
    for (const auto& [k, v] : now) std::fprintf(f, "    {\"%s\", 0x%016llxull},\n", k.c_str(), static_cast<unsigned long long>(v));
    std::fprintf(f, "};\n");
    std::fclose(f);
    return;
  }
  CHECK(now.size() == std::size(recorded_cases));
  for (const auto& r : recorded_cases) {
    INFO(r.name);
    const auto it = now.find(r.name);
    REQUIRE(it != now.end());
    CHECK(it->second == r.hash);
  }
}
