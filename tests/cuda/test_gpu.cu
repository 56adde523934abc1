// The cuda backend on a GPU: smear::layer<E, N, backend::cuda> against the reference layer for
// every expert type, forward and backward, odd sizes included, and its error paths (shapes,
// host pointers, the null stream, out-of-memory). Exits with 77 (ctest: skipped) when the
// machine has no CUDA device, so a machine without a GPU never reports it passed.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <smear/cuda.hpp>

#include "agreement.hpp"

using namespace smear;
using smear::testing::agreement_case;
using smear::testing::random_vector;

namespace {

struct gpu_memory {
  template <class T>
  device::device_buffer<T> upload(const std::vector<T>& v) const {
    device::device_buffer<T> b;
    b.reserve(v.size(), "a test tensor");
    REQUIRE(cudaMemcpy(b.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
    return b;
  }
  template <class T>
  std::vector<T> download(const T* p, std::size_t n) const {
    std::vector<T> v(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
  }
};

struct stream_guard {
  cudaStream_t s = nullptr;
  stream_guard() { REQUIRE(cudaStreamCreate(&s) == cudaSuccess); }
  ~stream_guard() { cudaStreamDestroy(s); }
};

template <class Expert, std::size_t N>
void check(const Expert& proto, agreement_case c, std::uint64_t seed, layer_options opt = {}) {
  stream_guard stream;
  layer<Expert, N, backend::reference> ref{proto, opt, seed};
  layer<Expert, N, backend::cuda> fast{proto, opt, seed, stream.s};
  gpu_memory mem;
  testing::check_agreement(ref, fast, mem, c, seed);
}

}  // namespace

TEST_CASE("cuda layer equals the reference layer: adapter") {
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
  SUBCASE("evaluation mode") { check<E, 4>(E{9, 3}, {.train = false}, 41, {.router = {.expert_dropout = 0.5}}); }
  SUBCASE("T5-base sized block") { check<E, 8>(E{768, 24}, {.B = 4, .L = 33}, 42); }
}

TEST_CASE("cuda layer equals the reference layer: lora, linear, double") {
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

TEST_CASE("cuda layer equals the reference layer: ensemble, top-k, tag, hash, adamix, latent skills") {
  using E = adapter<float>;
  SUBCASE("tag") { check<E, 4>(E{9, 3}, {.B = 6, .L = 4, .tags = true}, 61, {.routing = {.strategy = strategy::tag}}); }
  SUBCASE("hash of token ids") {
    check<E, 3>(E{9, 3}, {.B = 6, .L = 4, .token_ids = true}, 62,
                {.routing = {.strategy = strategy::hash, .hash_seed = 5}});
  }
  SUBCASE("hash of example ids") { check<E, 5>(E{9, 3}, {.B = 7, .L = 3}, 63, {.routing = {.strategy = strategy::hash}}); }
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
}

TEST_CASE("cuda layer errors") {
  using E = adapter<float>;
  stream_guard stream;
  SUBCASE("the null stream is refused with a sentence") {
    CHECK_THROWS_WITH_AS((layer<E, 2, backend::cuda>{E{4, 2}, {}, 1, nullptr}),
                         doctest::Contains("the stream is null"), value_error);
  }
  SUBCASE("host pointers are refused") {
    layer<E, 2, backend::cuda> block{E{4, 2}, {}, 1, stream.s};
    std::vector<float> x(2 * 3 * 4), y(x.size());
    CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 4), y),
                         doctest::Contains("x points to host memory"), value_error);
  }
  SUBCASE("shapes") {
    layer<E, 2, backend::cuda> block{E{4, 2}, {}, 1, stream.s};
    gpu_memory mem;
    auto x = mem.upload(std::vector<float>(2 * 3 * 4, 0.5f));
    auto y = mem.upload(std::vector<float>(2 * 3 * 4));
    CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 5), {y.data(), 24}),
                         doctest::Contains("[2, 3, 5], the experts expect d = 4"), shape_error);
    CHECK_THROWS_AS(block.backward({y.data(), 24}, {y.data(), 24}), state_error);
    block.forward(make_tokens<const float>(x.data(), 2, 3, 4), {y.data(), 24});
    CHECK_THROWS_WITH_AS(block.backward({y.data(), 24}, {y.data(), 23}), doctest::Contains("dx has 23"),
                         shape_error);
  }
  SUBCASE("out of device memory names the buffer and the bytes") {
    device::device_buffer<float> huge;
    const std::size_t n = std::size_t{1} << 46;  // 256 TiB
    try {
      huge.reserve(n, "a test buffer");
      FAIL("an allocation of 256 TiB succeeded");
    } catch (const device::out_of_memory& e) {
      CHECK(e.bytes() == n * sizeof(float));
      CHECK(std::string(e.what()).find("a test buffer") != std::string::npos);
      CHECK(std::string(e.what()).find(std::to_string(n * sizeof(float))) != std::string::npos);
    }
    // the device is still usable afterwards
    check<E, 2>(E{5, 2}, {}, 60);
  }
}

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    std::printf("no CUDA device on this machine: the GPU tests are skipped\n");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
