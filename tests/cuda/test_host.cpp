// The cuda backend's algorithm (its Thrust element-wise work and its batched-GEMM layout) run
// on the CPU: device_layer over device::host_context, Thrust on THRUST_DEVICE_SYSTEM_CPP,
// against the reference backend. Runs in the normal test suite, no GPU needed.

#include <doctest/doctest.h>

#include <smear/backend/cuda/device_layer.hpp>
#include <smear/backend/cuda/host_context.hpp>
#include <smear/smear.hpp>

#include "agreement.hpp"

using namespace smear;
using smear::testing::agreement_case;
using smear::testing::random_vector;

namespace {

struct host_memory {
  template <class T>
  std::vector<T> upload(std::vector<T> v) const { return v; }
  template <class T>
  std::vector<T> download(const T* p, std::size_t n) const { return std::vector<T>(p, p + n); }
};

template <class Expert, std::size_t N>
using host_layer = device::device_layer<Expert, N, device::host_context>;

template <class Expert, std::size_t N>
void check(const Expert& proto, agreement_case c, std::uint64_t seed, layer_options opt = {}) {
  layer<Expert, N, backend::reference> ref{proto, opt, seed};
  host_layer<Expert, N> fast{proto, opt, seed};
  host_memory mem;
  testing::check_agreement(ref, fast, mem, c, seed);
}

}  // namespace

TEST_CASE("cuda algorithm on the host: starts from the same parameters as the host layers") {
  adapter<float> proto{9, 4};
  layer<adapter<float>, 3, backend::reference> ref{proto, {}, 5};
  host_layer<adapter<float>, 3> fast{proto, {}, 5};
  fast.download();
  auto a = ref.bank().values(), b = fast.bank().values();
  CHECK(std::equal(a.data, a.data + a.rows * a.cols, b.data));
  CHECK(std::equal(ref.router().values().begin(), ref.router().values().end(),
                   fast.router().values().begin()));
}

TEST_CASE("cuda algorithm on the host equals the reference layer: adapter") {
  using E = adapter<float>;
  SUBCASE("odd sizes, ragged") { check<E, 3>(E{13, 5}, {.B = 5, .L = 7}, 31); }
  SUBCASE("B = 1, L = 1") { check<E, 8>(E{17, 3}, {.B = 1, .L = 1}, 32); }
  SUBCASE("full batch without lengths") { check<E, 4>(E{10, 3}, {.B = 3, .L = 4, .full = true}, 33); }
  SUBCASE("gelu, up bias, plain mean over padding") {
    check<E, 4>(E{24, 6, {.act = activation::gelu, .up_bias = true}}, {.B = 6, .L = 9}, 34,
                {.router = {.pool = pooling::mean}});
  }
  SUBCASE("relu and identity") {
    check<E, 2>(E{8, 3, {.act = activation::relu}}, {}, 35);
    check<E, 2>(E{8, 3, {.act = activation::identity}}, {}, 36);
  }
  SUBCASE("no LayerNorm, temperature 0.5") {
    check<E, 5>(E{11, 4}, {.B = 4, .L = 6}, 37, {.router = {.layer_norm = false, .temperature = 0.5}});
  }
  SUBCASE("detached router input") { check<E, 3>(E{7, 2}, {}, 38, {.router = {.detach_input = true}}); }
  SUBCASE("expert dropout, including rows with every expert dropped") {
    check<E, 6>(E{12, 4}, {.B = 8, .L = 4}, 39, {.router = {.expert_dropout = 0.3}});
    check<E, 2>(E{6, 2}, {.B = 16, .L = 3}, 40, {.router = {.expert_dropout = 0.9}});
  }
  SUBCASE("evaluation mode turns dropout off") {
    check<E, 4>(E{9, 3}, {.train = false}, 41, {.router = {.expert_dropout = 0.5}});
  }
  SUBCASE("residual turned off") { check<E, 3>(E{9, 3}, {}, 42, {.residual = false}); }
}

TEST_CASE("cuda algorithm on the host equals the reference layer: lora, linear, double") {
  rng gen{50};
  SUBCASE("lora over a frozen map with bias") {
    lora<float> e{10, 6, 2, random_vector<float>(60, gen), random_vector<float>(6, gen), {.alpha = 4}};
    check<lora<float>, 3>(e, {.B = 4, .L = 5}, 51);
  }
  SUBCASE("lora without a frozen map") { check<lora<float>, 3>(lora<float>{7, 7, 3}, {}, 52); }
  SUBCASE("linear with and without bias") {
    check<linear<float>, 2>(linear<float>{7, 9}, {.B = 3, .L = 4}, 53);
    check<linear<float>, 4>(linear<float>{5, 3, {.bias = false}}, {.B = 2, .L = 6}, 54);
  }
  SUBCASE("double") {
    check<adapter<double>, 4>(adapter<double>{11, 6, {.up_bias = true}}, {.B = 3, .L = 5}, 55);
    check<lora<double>, 2>(lora<double>{6, 4, 2, random_vector<double>(24, gen)}, {}, 56);
  }
}

TEST_CASE("cuda algorithm on the host equals the reference layer: ensemble, top-k, tag, hash, adamix, latent skills") {
  using E = adapter<float>;
  SUBCASE("tag") { check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .tags = true}, 61, {.routing = {.strategy = strategy::tag}}); }
  SUBCASE("hash of token ids") {
    check<E, 3>(E{9, 3}, {.B = 6, .L = 4, .token_ids = true}, 62,
                {.routing = {.strategy = strategy::hash, .hash_seed = 5}});
  }
  SUBCASE("hash of example ids") {
    check<E, 5>(E{9, 3}, {.B = 7, .L = 3}, 63, {.routing = {.strategy = strategy::hash}});
  }
  SUBCASE("adamix: a random expert per parameter group in training, the average at inference") {
    check<E, 4>(E{9, 3, {.up_bias = true}}, {.B = 6, .L = 4}, 64, {.routing = {.strategy = strategy::adamix}});
    check<E, 3>(E{9, 3}, {.B = 5, .L = 3, .train = false}, 65, {.routing = {.strategy = strategy::adamix}});
  }
  SUBCASE("ensemble: every expert's output weighted by p, with expert dropout and at inference") {
    check<E, 3>(E{9, 3, {.up_bias = true}}, {.B = 5, .L = 4}, 68,
                {.router = {.expert_dropout = 0.3}, .routing = {.strategy = strategy::ensemble}});
    check<E, 4>(E{7, 2}, {.B = 3, .L = 5, .train = false}, 69, {.routing = {.strategy = strategy::ensemble}});
    check<lora<float>, 3>(lora<float>{6, 5, 2, std::vector<float>(30, 0.1f)}, {.B = 3, .L = 4}, 70,
                          {.routing = {.strategy = strategy::ensemble}});
    check<linear<float>, 2>(linear<float>{4, 6}, {.B = 2, .L = 3}, 71, {.routing = {.strategy = strategy::ensemble}});
  }
  SUBCASE("top-k: ST-Gumbel (k = 1 and 2), REINFORCE with both baselines, at inference too") {
    using strategy_t = smear::strategy;
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4}, 72, {.routing = {.strategy = strategy_t::top_k}});
    check<E, 5>(E{8, 2, {.up_bias = true}}, {.B = 4, .L = 3}, 73, {.routing = {.strategy = strategy_t::top_k, .k = 2}});
    check<E, 3>(E{8, 2}, {.B = 4, .L = 3, .train = false}, 74, {.routing = {.strategy = strategy_t::top_k, .k = 2}});
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .losses = true}, 75,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::reinforce, .entropy_bonus = 0.1}});
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .losses = true}, 76,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::reinforce,
                             .baseline = baseline::learned}});
    check<E, 3>(E{9, 3}, {.B = 5, .L = 4, .train = false}, 77,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::reinforce}});
  }
  SUBCASE("top-k with DSelect-k: N a power of two and not, entropy and unused-code terms, inference") {
    using strategy_t = smear::strategy;
    check<E, 4>(E{9, 3}, {.B = 5, .L = 4}, 78,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::dselect}});
    check<E, 5>(E{8, 2}, {.B = 6, .L = 3}, 79,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::dselect,
                             .dselect_entropy = 0.1, .dselect_unused_penalty = 0.5}});
    check<E, 3>(E{8, 2}, {.B = 4, .L = 3, .train = false}, 80,
                {.routing = {.strategy = strategy_t::top_k, .estimator = estimator::dselect}});
  }
  SUBCASE("latent skills, training and inference") {
    const layer_options o{.routing = {.strategy = strategy::latent_skills, .tasks = 3}};
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .tags = true}, 66, o);
    check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .train = false, .tags = true}, 67, o);
  }
  SUBCASE("strategy options are validated as by smear::layer") {
    CHECK_THROWS_AS((host_layer<E, 2>{E{4, 2}, {.routing = {.strategy = strategy::top_k, .k = 3}}, 1}), value_error);
  }
  SUBCASE("tag errors") {
    host_layer<E, 2> block{E{4, 2}, {.routing = {.strategy = strategy::tag}}, 1};
    std::vector<float> x(2 * 4), y(x.size());
    std::vector<std::int32_t> tags{0, 2};
    CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 1, 4), y, {.tags = tags}),
                         doctest::Contains("example 1 has tag 2, expected 0..1"), value_error);
    CHECK_THROWS_AS(block.forward(make_tokens<const float>(x.data(), 2, 1, 4), y), shape_error);
  }
}

TEST_CASE("cuda layer errors name the operation and the shapes") {
  using E = adapter<float>;
  host_layer<E, 3> block{E{6, 2}, {}, 1};
  std::vector<float> x(2 * 3 * 6), y(x.size());
  std::vector<std::int32_t> lengths{3, 1};
  auto xs = make_tokens<const float>(x.data(), 2, 3, 6, lengths);
  CHECK_THROWS_AS(block.backward(y, y), state_error);
  CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 5), y),
                       doctest::Contains("x is [B, L, d] = [2, 3, 5], the experts expect d = 6"),
                       shape_error);
  CHECK_THROWS_WITH_AS(block.forward(xs, {y.data(), y.size() - 1}),
                       doctest::Contains("expected [B, L, d_out] = [2, 3, 6]"), shape_error);
  std::vector<std::int32_t> bad{3, 0};
  CHECK_THROWS_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 6, bad), y), value_error);
  std::vector<std::int32_t> short_lengths{3};
  CHECK_THROWS_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 6, short_lengths), y), shape_error);
  CHECK_THROWS_AS(block.forward(make_tokens<const float>(x.data(), 0, 3, 6), y), value_error);
  block.forward(xs, y);
  CHECK_THROWS_WITH_AS(block.backward(y, {y.data(), 5}), doctest::Contains("dx has 5 values"), shape_error);
  block.backward(y, y);
  CHECK_THROWS_AS(block.backward(y, y), state_error);
  CHECK_THROWS_AS((host_layer<E, 2>{E{6, 2}, {.router = {.temperature = 0}}, 1}), value_error);
  CHECK_THROWS_AS((host_layer<linear<float>, 2>{linear<float>{4, 5}, {.residual = true}, 1}), value_error);
}

TEST_CASE("cuda layer in checked mode reports a non-finite input") {
  using E = adapter<float>;
  host_layer<E, 2> block{E{4, 2}, {.check_finite = true}, 1};
  std::vector<float> x(2 * 2 * 4, 0.5f), y(x.size());
  x[9] = std::nanf("");
  CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 2, 4), y),
                       doctest::Contains("x holds nan at flat index 9"), numeric_error);
}
