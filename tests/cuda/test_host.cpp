// The cuda backend's algorithm (its Thrust element-wise work and its batched-GEMM layout) run
// on the CPU: device_layer over device::host_context, Thrust on THRUST_DEVICE_SYSTEM_CPP,
// against the reference backend. Runs in the normal test suite, no GPU needed.

#include <doctest/doctest.h>

#include <smear/cuda/device_layer.hpp>
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

#define SMEAR_AGREEMENT_SUBJECT "cuda algorithm on the host"
#include "agreement_cases.hpp"

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

TEST_CASE("cuda layer in checked mode reports a non-finite input") {
  using E = adapter<float>;
  host_layer<E, 2> block{E{4, 2}, {.check_finite = true}, 1};
  std::vector<float> x(2 * 2 * 4, 0.5f), y(x.size());
  x[9] = std::nanf("");
  CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 2, 4), y),
                       doctest::Contains("x holds nan at flat index 9"), numeric_error);
}
