// The cuda backend's algorithm (its Thrust element-wise work and its batched-GEMM layout) run
// on the CPU: device_layer over device::host_context, Thrust on THRUST_DEVICE_SYSTEM_CPP,
// against the reference backend. Runs in the normal test suite, no GPU needed.

#include <doctest/doctest.h>

#include <smear/cuda/device_layer.hpp>
#include <smear/backend/cuda/host_context.hpp>
#include <smear/cuda/optimizers.hpp>
#include <smear/smear.hpp>

#include "support/agreement.hpp"
#include "support/allocations.hpp"

using namespace smear;
using smear::testing::agreement_case;
using smear::testing::random_vector;

namespace {

template <class Expert, std::size_t N>
using host_layer = device::device_layer<Expert, N, device::host_context>;

template <class Expert, std::size_t N>
void check(const Expert& proto, agreement_case c, std::uint64_t seed, layer_options opt = {}) {
  layer<Expert, N, backend::reference> ref{proto, opt, seed};
  host_layer<Expert, N> fast{proto, opt, seed};
  testing::host_memory mem;
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

#define SMEAR_AGREEMENT_SUBJECT "cuda algorithm on the host"
#include "support/agreement_cases.hpp"

TEST_CASE("cuda algorithm on the host: strategy errors as smear::layer gives them") {
  using E = adapter<float>;
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

TEST_CASE("cuda layer of conv adapters refuses an example that is not a whole map, as smear::layer does") {
  using C = conv_adapter<float>;
  host_layer<C, 2> block{C{2, 2, 3, 2}, {}, 1};
  layer<C, 2, backend::reference> ref{C{2, 2, 3, 2}, {}, 1};
  std::vector<float> x(2 * 4 * 3), y(x.size());
  std::vector<std::int32_t> lengths{4, 3};
  const auto padded = make_tokens<const float>(x.data(), 2, 4, 3, lengths);
  CHECK_THROWS_WITH_AS(block.forward(padded, y), doctest::Contains("an example has 3 rows, the expert's map is [H, W] = [2, 2]"),
                       shape_error);
  CHECK_THROWS_WITH_AS(ref.forward(padded, y), doctest::Contains("an example has 3 rows, the expert's map is [H, W] = [2, 2]"),
                       shape_error);
  CHECK_THROWS_AS(block.forward(make_tokens<const float>(x.data(), 3, 2, 4), {y.data(), 3 * 2 * 3}), shape_error);
  CHECK_THROWS_AS(block.backward(y, y), state_error);  // nothing ran
}

// the contracts of smear/backend_concepts.hpp, met by what smear ships and refused otherwise
static_assert(execution_context<device::host_context, float> && execution_context<device::host_context, double>);
static_assert(device_expert_kernel<device::device_expert<adapter<float>, device::host_context>, device::host_context, float>);
static_assert(device_expert_kernel<device::device_expert<conv_adapter<double>, device::host_context>, device::host_context,
                                   double>);
static_assert(device_expert_kernel<device::device_expert<lora<float>, device::host_context>, device::host_context, float>);
namespace {
struct no_batched_gemm : device::host_context {
  template <class T>
  void gemm_batched() const {}
};
struct no_backward : device::device_expert<linear<float>, device::host_context> {
  void backward() const {}
};
}  // namespace
static_assert(!execution_context<no_batched_gemm, float>);
static_assert(!device_expert_kernel<no_backward, device::host_context, float>);

TEST_CASE("cuda layer in checked mode reports a non-finite input") {
  using E = adapter<float>;
  host_layer<E, 2> block{E{4, 2}, {.check_finite = true}, 1};
  std::vector<float> x(2 * 2 * 4, 0.5f), y(x.size());
  x[9] = std::nanf("");
  CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 2, 4), y),
                       doctest::Contains("x holds nan at flat index 9"), numeric_error);
}

namespace {

/// Trains a reference layer with `HostOpt` and the cuda algorithm with `DeviceOpt` for a few
/// steps by the same loop, and compares every parameter afterwards.
template <class HostOpt, class DeviceOpt, class Options>
void check_training(layer_options opt, const Options& o, route_inputs in = {}) {
  using E = adapter<float>;
  constexpr std::size_t N = 3, B = 4, L = 3, d = 6;
  layer<E, N, backend::reference> ref{E{d, 2}, opt, 9};
  host_layer<E, N> fast{E{d, 2}, opt, 9};
  auto ref_params = ref.parameters();
  auto fast_params = fast.parameters();
  REQUIRE(ref_params.size() == fast_params.size());
  for (std::size_t i = 0; i < ref_params.size(); ++i) {
    CHECK(ref_params[i].name == fast_params[i].name);
    CHECK(fast_params[i].on_device == (ref_params[i].name.starts_with("experts") ||
                                       ref_params[i].name.starts_with("router.")));
  }
  const std::vector<float> start(ref_params[0].value.begin(), ref_params[0].value.end());
  HostOpt a{ref_params, o};
  DeviceOpt b{fast_params, o, fast.context()};
  rng gen{10};
  const std::vector<std::int32_t> lengths{3, 1, 2, 3};
  for (int step = 0; step < 3; ++step) {
    const auto x = random_vector<float>(B * L * d, gen), dy = random_vector<float>(B * L * d, gen);
    std::vector<float> y(x.size()), dx(x.size()), y2(x.size()), dx2(x.size());
    ref.forward(make_tokens<const float>(x.data(), B, L, d, lengths), y, in);
    ref.backward(dy, dx);
    a.step();
    a.zero_grad();
    fast.forward(make_tokens<const float>(x.data(), B, L, d, lengths), y2, in);
    fast.backward(dy, dx2);
    b.step();
    b.zero_grad();
  }
  fast.download();
  for (std::size_t i = 0; i < ref_params.size(); ++i) {
    INFO(ref_params[i].name);
    CHECK(testing::relative_error(fast_params[i].value, ref_params[i].value) < 1e-5);
    for (float g : fast_params[i].grad) CHECK(g == 0.0f);  // zero_grad reached the device
  }
  CHECK(testing::relative_error(ref_params[0].value, start) > 1e-4);  // the experts did move
  auto a0 = ref.bank().values(), a1 = fast.bank().values();
  CHECK(testing::relative_error(std::vector<float>(a1.data, a1.data + a1.rows * a1.cols),
                                std::vector<float>(a0.data, a0.data + a0.rows * a0.cols)) < 1e-5);
}

}  // namespace

TEST_CASE("cuda algorithm on the host: one training loop, the same code as on the host") {
  const std::int32_t tags[4] = {0, 2, 1, 0};
  SUBCASE("adamw, smear") {
    check_training<smear::adamw<float>, device::adamw<float, device::host_context>>({}, adamw_options{.lr = 1e-2});
  }
  SUBCASE("sgd with Nesterov momentum, latent skills (the allocation is a host tensor)") {
    check_training<smear::sgd<float>, device::sgd<float, device::host_context>>(
        {.routing = {.strategy = strategy::latent_skills, .tasks = 3}},
        sgd_options{.lr = 0.05, .momentum = 0.9, .nesterov = true}, {.tags = tags});
  }
  SUBCASE("host optimisers refuse device tensors") {
    host_layer<adapter<float>, 2> block{adapter<float>{4, 2}, {}, 1};
    CHECK_THROWS_WITH_AS(smear::adamw<float>{block.parameters()},
                         doctest::Contains("parameter 'experts' is in device memory"), value_error);
    CHECK_THROWS_AS(smear::sgd<float>{block.parameters()}, value_error);
  }
}

TEST_CASE("cuda algorithm on the host: forward + backward allocate nothing after a warm-up") {
  using E = adapter<float>;
  constexpr std::size_t B = 4, L = 12, d = 32, m = 8;
  const std::vector<std::int32_t> lengths{12, 7, 1, 10};
  for (const char* name : {"smear", "ensemble", "st_gumbel", "reinforce", "dselect", "switch", "tag", "hash", "adamix",
                           "latent_skills", "random", "cluster", "soft_moe"}) {
    strategy_options routing = parse_strategy(name);
    routing.tasks = 4;  // latent skills: one row per tag
    for (bool training : {true, false}) {
      CAPTURE(name);
      CAPTURE(training);
      host_layer<E, 8> block{E{d, m}, {.router = {.expert_dropout = 0.1}, .routing = routing}, 6};
      block.train(training);
      CHECK(testing::steady_state_allocations(block, B, L, lengths) == 0);
    }
  }
  SUBCASE("smear inference through the merged-expert cache") {
    host_layer<E, 8> block{E{d, m}, {}, 7};
    const std::vector<float> p(4 * 8, 1.0f / 8);
    block.set_task_routing(matrix_ref<const float>{p.data(), 4, 8});
    block.train(false);
    CHECK(testing::steady_state_allocations(block, B, L, lengths) == 0);
  }
}
