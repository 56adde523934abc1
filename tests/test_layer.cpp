// The SMEAR layer: gradients against finite differences, cpu against reference, the
// properties merging must have, and every error path.

#include <doctest/doctest.h>

#include <numeric>
#include <smear/smear.hpp>

#include "support/testing.hpp"

using namespace smear;
using smear::testing::check_gradient;
using smear::testing::random_vector;

namespace {

struct problem {
  std::size_t B, L;
  std::vector<std::int32_t> lengths;
};

/// With a detached router input, ∂ℓ/∂x is the expert path alone, the routing held fixed, which
/// central differences of the whole loss do not see. Hold the routing fixed by running each
/// example through a layer with a constant router (weight 0, bias log p_b) and differentiate
/// that.
template <class Expert, std::size_t N>
void check_detached_input(layer<Expert, N, backend::reference>& block, const problem& pr, std::uint64_t seed) {
  rng gen{seed};
  const std::size_t din = block.input_dim(), dout = block.output_dim();
  auto x = random_vector<double>(pr.B * pr.L * din, gen);
  const auto w = random_vector<double>(pr.B * pr.L * dout, gen);
  std::vector<double> y(pr.B * pr.L * dout), dx(x.size());
  block.reseed(seed);
  block.forward(make_tokens<const double>(x.data(), pr.B, pr.L, din, pr.lengths), y);
  block.backward(w, dx);
  for (std::size_t b = 0; b < pr.B; ++b) {
    layer<Expert, N, backend::reference> fixed{block.expert(), {.router = {.layer_norm = false}}};
    std::copy_n(block.bank().values().data, N * block.bank().parameter_count(), fixed.bank().values().data);
    auto r = fixed.router().values();
    std::fill(r.begin(), r.end(), 0.0);
    for (std::size_t e = 0; e < N; ++e) r[r.size() - N + e] = std::log(block.routing()(b, e));
    std::vector<std::int32_t> len{pr.lengths.empty() ? static_cast<std::int32_t>(pr.L) : pr.lengths[b]};
    std::span<double> xb(x.data() + b * pr.L * din, pr.L * din);
    std::span<const double> wb(w.data() + b * pr.L * dout, pr.L * dout);
    std::vector<double> yb(pr.L * dout);
    auto loss_b = [&] {
      fixed.forward(make_tokens<const double>(xb.data(), 1, pr.L, din, len), yb);
      return testing::weighted_sum(yb, wb);
    };
    check_gradient("input, routing held fixed", xb,
                   std::span<const double>(dx.data() + b * pr.L * din, pr.L * din), loss_b);
  }
}

/// Every gradient of a layer (each parameter tensor and the input) against central
/// differences, through the public checker smear::testing::check_layer.
template <class Expert, std::size_t N>
void check_layer_gradients(layer<Expert, N, backend::reference>& block, const problem& pr, std::uint64_t seed) {
  auto reports = testing::check_layer(block, pr.B, pr.L, pr.lengths, seed);
  if (block.router().options().detach_input) {
    REQUIRE(reports.back().what == "input");
    reports.pop_back();
    check_detached_input(block, pr, seed + 1);
  }
  testing::check_reports(reports);
}

const problem ragged{3, 4, {4, 2, 3}};

}  // namespace

TEST_CASE("layer gradients match finite differences") {
  using E = adapter<double>;
  SUBCASE("defaults: masked mean, LayerNorm, SiLU, residual") {
    layer<E, 3, backend::reference> block{E{5, 3}, {}, 1};
    check_layer_gradients(block, ragged, 2);
  }
  SUBCASE("no LayerNorm, plain mean over padding, temperature 0.5, up bias") {
    layer<E, 4, backend::reference> block{E{5, 2, {.up_bias = true}},
                                          {.router = {.pool = pooling::mean, .layer_norm = false,
                                                      .temperature = 0.5}}, 3};
    check_layer_gradients(block, ragged, 4);
  }
  SUBCASE("detached router input") {
    layer<E, 2, backend::reference> block{E{4, 3, {.act = activation::gelu}},
                                          {.router = {.detach_input = true}}, 5};
    check_layer_gradients(block, ragged, 6);
  }
  SUBCASE("expert dropout in training") {
    layer<E, 5, backend::reference> block{E{4, 2}, {.router = {.expert_dropout = 0.4}}, 7};
    check_layer_gradients(block, problem{4, 3, {3, 1, 2, 3}}, 8);
  }
  SUBCASE("full-length batch without lengths") {
    layer<E, 3, backend::reference> block{E{3, 2}, {}, 9};
    check_layer_gradients(block, problem{2, 3, {}}, 10);
  }
  SUBCASE("lora experts over a frozen map, not residual") {
    rng gen{11};
    using LE = lora<double>;
    layer<LE, 3, backend::reference> block{
        LE{4, 3, 2, random_vector<double>(12, gen), random_vector<double>(3, gen)}, {}, 12};
    CHECK_FALSE(block.residual());
    check_layer_gradients(block, ragged, 13);
  }
  SUBCASE("linear experts") {
    layer<linear<double>, 2, backend::reference> block{linear<double>{3, 5}, {}, 14};
    check_layer_gradients(block, ragged, 15);
  }
  SUBCASE("router weights normalised per expert (the official normalize_router_weights), no router bias") {
    layer<E, 4, backend::reference> block{E{5, 2}, {.router = {.normalize_weights = true, .bias = false}}, 18};
    check_layer_gradients(block, ragged, 19);
    layer<E, 3, backend::reference> plain{E{4, 2}, {.router = {.layer_norm = false, .normalize_weights = true}}, 20};
    check_layer_gradients(plain, ragged, 21);
  }
  SUBCASE("the official preset") {
    layer<E, 3, backend::reference> block{E{5, 2}, official_options({}), 22};
    check_layer_gradients(block, ragged, 23);
  }
  SUBCASE("the mergeable archetype") {
    layer<archetypes::mergeable_expert<double>, 3, backend::reference> block{
        archetypes::mergeable_expert<double>{4}, {}, 16};
    check_layer_gradients(block, ragged, 17);
  }
}

namespace {

template <std::size_t N>
struct fixture {
  static constexpr std::size_t B = 3, L = 4, d = 6, m = 3;
  adapter<double> proto{d, m, {.up_bias = true}};
  layer<adapter<double>, N, backend::reference> block{proto, {}, 41};
  std::vector<std::int32_t> lengths{4, 1, 3};
  std::vector<double> x, y;
  fixture() {
    rng gen{42};
    x = random_vector<double>(B * L * d, gen);
    y.resize(x.size());
    auto v = block.bank().values();
    for (std::size_t i = 0; i < v.rows * v.cols; ++i) v.data[i] = 0.4 * gen.normal();
  }
  tokens<const double> xs() const { return make_tokens<const double>(x.data(), B, L, d, lengths); }
  /// Sets the router so it puts all mass on `e` (weight 0, bias a large one-hot), or to
  /// uniform when e == N.
  void force_routing(std::size_t e) {
    auto r = block.router().values();
    std::fill(r.begin(), r.end(), 0.0);
    const auto& s = find_slot(block.router().layout(), "layer_norm.weight");
    std::fill(r.begin() + static_cast<std::ptrdiff_t>(s.offset),
              r.begin() + static_cast<std::ptrdiff_t>(s.offset + s.size()), 1.0);
    if (e < N) r[r.size() - N + e] = 800.0;
  }
  /// x + expert(x; params) on the valid rows of example b, zero elsewhere.
  std::vector<double> direct(std::size_t b, std::span<const double> params) const {
    const std::size_t rows = static_cast<std::size_t>(lengths[b]);
    std::vector<double> out(L * d, 0.0), saved(proto.saved_size(rows));
    proto.forward(backend::reference{}, params, matrix_ref<const double>{x.data() + b * L * d, rows, d},
                  matrix_ref<double>{out.data(), rows, d}, std::span<double>(saved));
    for (std::size_t i = 0; i < rows * d; ++i) out[i] += x[b * L * d + i];
    return out;
  }
  std::vector<double> output(std::size_t b) const {
    return {y.begin() + static_cast<std::ptrdiff_t>(b * L * d),
            y.begin() + static_cast<std::ptrdiff_t>((b + 1) * L * d)};
  }
};

}  // namespace

TEST_CASE("merging: one-hot routing reproduces that expert exactly") {
  fixture<4> f;
  for (std::size_t e = 0; e < 4; ++e) {
    f.force_routing(e);
    f.block.forward(f.xs(), f.y);
    for (std::size_t b = 0; b < f.B; ++b) {
      CHECK(f.block.routing()(b, e) == 1.0);
      CHECK(f.output(b) == f.direct(b, f.block.bank()[e]));
    }
  }
}

TEST_CASE("merging: equal probabilities reproduce the parameter-averaged expert") {
  fixture<4> f;
  f.force_routing(4);
  f.block.forward(f.xs(), f.y);
  std::vector<double> avg(f.block.bank().parameter_count(), 0.0);
  for (std::size_t e = 0; e < 4; ++e)
    for (std::size_t i = 0; i < avg.size(); ++i) avg[i] += 0.25 * f.block.bank()[e][i];
  for (std::size_t b = 0; b < f.B; ++b)
    CHECK(testing::relative_error(f.output(b), f.direct(b, avg)) < 1e-14);
}

TEST_CASE("merging: permuting the experts and router rows changes no output") {
  fixture<3> f;
  auto r = f.block.router().values();
  rng gen{5};
  for (auto& v : r) v = gen.normal();
  f.block.forward(f.xs(), f.y);
  const auto before = f.y;
  const auto routing_before = std::vector<double>(f.block.routing().data, f.block.routing().data + f.B * 3);
  const std::size_t perm[3] = {2, 0, 1};  // new expert i is old expert perm[i]
  const std::size_t P = f.block.bank().parameter_count(), d = f.d;
  const auto old_bank = std::vector<double>(f.block.bank().values().data, f.block.bank().values().data + 3 * P);
  const auto old_router = std::vector<double>(r.begin(), r.end());
  const std::size_t w_off = find_slot(f.block.router().layout(), "weight").offset;
  const std::size_t b_off = find_slot(f.block.router().layout(), "bias").offset;
  for (std::size_t i = 0; i < 3; ++i) {
    std::copy_n(old_bank.begin() + static_cast<std::ptrdiff_t>(perm[i] * P), P, f.block.bank()[i].begin());
    std::copy_n(old_router.begin() + static_cast<std::ptrdiff_t>(w_off + perm[i] * d), d,
                r.begin() + static_cast<std::ptrdiff_t>(w_off + i * d));
    r[b_off + i] = old_router[b_off + perm[i]];
  }
  f.block.forward(f.xs(), f.y);
  CHECK(testing::relative_error(f.y, before) < 1e-14);
  for (std::size_t b = 0; b < f.B; ++b)
    for (std::size_t i = 0; i < 3; ++i)
      CHECK(f.block.routing()(b, i) == doctest::Approx(routing_before[b * 3 + perm[i]]).epsilon(1e-14));
}

TEST_CASE("padding tokens change nothing") {
  fixture<3> f;
  f.block.forward(f.xs(), f.y);
  const auto before = f.y;
  const auto routing_before = std::vector<double>(f.block.routing().data, f.block.routing().data + f.B * 3);
  for (std::size_t b = 0; b < f.B; ++b)
    for (std::size_t t = static_cast<std::size_t>(f.lengths[b]); t < f.L; ++t)
      for (std::size_t j = 0; j < f.d; ++j) f.x[(b * f.L + t) * f.d + j] = 1e3 * (1.0 + double(j));
  f.block.forward(f.xs(), f.y);
  CHECK(f.y == before);
  CHECK(std::vector<double>(f.block.routing().data, f.block.routing().data + f.B * 3) == routing_before);
  // and padding rows of the output are zero
  CHECK(f.y[(1 * f.L + 2) * f.d] == 0.0);
}

TEST_CASE("N = 1 equals a plain adapter") {
  fixture<1> f;
  f.block.forward(f.xs(), f.y);
  for (std::size_t b = 0; b < f.B; ++b) CHECK(f.output(b) == f.direct(b, f.block.bank()[0]));
}

TEST_CASE("a fresh block is close to the identity") {
  layer<adapter<float>, 8> block{adapter<float>{32, 8}, {}, 3};
  rng gen{1};
  const auto x = random_vector<float>(2 * 5 * 32, gen);
  std::vector<float> y(x.size());
  block.forward(make_tokens<const float>(x.data(), 2, 5, 32), y);
  CHECK(testing::relative_error(y, x) < 1e-3);
  // and its routing is close to uniform
  for (std::size_t e = 0; e < 8; ++e) CHECK(block.routing()(0, e) == doctest::Approx(0.125).epsilon(0.05));
}

TEST_CASE("the same seed gives the same layer and the same results") {
  auto run = [] {
    layer<adapter<float>, 4> block{adapter<float>{16, 4}, {.router = {.expert_dropout = 0.2}}, 77};
    rng gen{3};
    const auto x = random_vector<float>(3 * 4 * 16, gen);
    std::vector<float> y(x.size()), dx(x.size());
    block.forward(make_tokens<const float>(x.data(), 3, 4, 16), y);
    block.backward(y, dx);
    return std::make_pair(y, dx);
  };
  CHECK(run() == run());
}

TEST_CASE("errors name the operation and the shapes, before any work") {
  using E = adapter<float>;
  layer<E, 2> block{E{4, 2}, {}, 0};
  std::vector<float> x(2 * 3 * 4, 0.5f), y(x.size()), dx(x.size());
  std::vector<std::int32_t> lengths{3, 2};
  auto xs = make_tokens<const float>(x.data(), 2, 3, 4, lengths);
  auto throws_with = [](auto&& f, auto tag, const std::string& text) {
    using Ex = decltype(tag);
    try {
      f();
      FAIL("no exception, expected one mentioning: " << text);
    } catch (const Ex& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(text) != std::string::npos);
    }
  };
  throws_with([&] { block.backward(y, dx); }, state_error{""}, "no forward");
  throws_with([&] { block.forward(make_tokens<const float>(x.data(), 2, 4, 3), y); }, shape_error{""},
              "x is [B, L, d] = [2, 4, 3], the experts expect d = 4");
  throws_with([&] { block.forward(xs, std::span<float>(y).first(5)); }, shape_error{""},
              "y has 5 values, expected [B, L, d_out] = [2, 3, 4]");
  std::vector<std::int32_t> three{3, 3, 3};
  throws_with([&] { block.forward(make_tokens<const float>(x.data(), 2, 3, 4, three), y); }, shape_error{""},
              "lengths has 3 entries, expected B = 2");
  std::vector<std::int32_t> empty_example{3, 0};
  throws_with([&] { block.forward(make_tokens<const float>(x.data(), 2, 3, 4, empty_example), y); },
              value_error{""}, "example 1 has length 0");
  std::vector<std::int32_t> too_long{4, 1};
  throws_with([&] { block.forward(make_tokens<const float>(x.data(), 2, 3, 4, too_long), y); }, value_error{""},
              "example 0 has length 4, expected 1..L = 1..3");
  throws_with([&] { block.forward(make_tokens<const float>(x.data(), 0, 3, 4), y); }, value_error{""},
              "empty batch");
  block.forward(xs, y);
  throws_with([&] { block.backward(std::span<const float>(y).first(3), dx); }, shape_error{""},
              "dy has 3 values");
  throws_with([&] { block.backward(y, std::span<float>(dx).first(7)); }, shape_error{""}, "dx has 7 values");
  block.backward(y, dx);
  throws_with([&] { block.backward(y, dx); }, state_error{""}, "backward runs once per forward");

  throws_with([] { layer<E, 2> b{E{4, 2}, {.router = {.temperature = 0.0}}}; }, value_error{""},
              "temperature must be positive");
  throws_with([] { layer<E, 2> b{E{4, 2}, {.router = {.temperature = -1.0}}}; }, value_error{""},
              "temperature must be positive");
  throws_with([] { layer<E, 2> b{E{4, 2}, {.router = {.expert_dropout = 1.0}}}; }, value_error{""},
              "expert_dropout must be in [0, 1)");
  throws_with([] { layer<linear<float>, 2> b{linear<float>{4, 3}, {.residual = true}}; }, value_error{""},
              "residual needs input_dim == output_dim");
  std::vector<std::uint8_t> mask{1, 1, 0, 1, 0, 1};
  std::vector<std::int32_t> out(2);
  throws_with([&] { mask_to_lengths(mask, 2, 3, out); }, value_error{""}, "example 1 has a valid token at 2");
  throws_with([&] { mask_to_lengths(std::span(mask).first(5), 2, 3, out); }, shape_error{""},
              "mask has 5 elements, expected [batch, length] = [2, 3]");
  mask = {1, 1, 0, 1, 0, 0};
  mask_to_lengths(mask, 2, 3, out);
  CHECK(out == std::vector<std::int32_t>{2, 1});
}

TEST_CASE("sizes that wrap around std::size_t are refused, naming the dimensions") {
  using E = adapter<float>;
  layer<E, 2> block{E{4, 2}, {}, 0};
  std::vector<float> x(16), y;  // B·L·d = 1·2^62·4 = 2^64 wraps to 0, the size of y
  const auto huge = make_tokens<const float>(x.data(), 1, std::size_t{1} << 62, 4);
  CHECK_THROWS_WITH_AS(block.forward(huge, y), doctest::Contains("x [B, L, d] = [1, 4611686018427387904, 4]"),
                       shape_error);
  // a product that fits in elements but not in bytes
  const auto bytes = make_tokens<const float>(x.data(), 1, std::size_t{1} << 61, 4);
  CHECK_THROWS_AS(block.forward(bytes, y), shape_error);
  std::vector<std::uint8_t> mask(4, 1);
  std::vector<std::int32_t> out(2);
  CHECK_THROWS_WITH_AS(mask_to_lengths(mask, 2, (std::size_t{1} << 63) + 2, out),
                       doctest::Contains("more elements than memory can address"), shape_error);
  CHECK_THROWS_AS((layer<E, 2>{E{4, 2}, {.router = {.temperature = 1e-39}}, 0}), value_error);  // 1/τ overflows float
  layer<adapter<double>, 2> fine{adapter<double>{4, 2}, {.router = {.temperature = 1e-39}}, 0};  // not double
  CHECK(fine.input_dim() == 4);
  // experts whose parameter count wraps: d·m = 2^64
  const std::size_t big = std::size_t{1} << 32;
  CHECK_THROWS_WITH_AS((E{big, big}), doctest::Contains("adapter: [dim, bottleneck] = [4294967296, 4294967296]"),
                       shape_error);
  CHECK_THROWS_AS((linear<float>{big, big}), shape_error);
  CHECK_THROWS_AS((lora<float>{big, 8, big}), shape_error);
  CHECK_THROWS_AS((conv_adapter<float>{big, big, 4, 2}), shape_error);
  CHECK_THROWS_AS((conv_adapter<float>{4, 4, big, big}), shape_error);
}

TEST_CASE("mask_to_lengths refuses a count an int32 length cannot hold" * doctest::skip(sizeof(void*) < 8)) {
  const std::size_t length = (std::size_t{1} << 31) + 3;  // 2 GiB of mask: one example, all valid
  std::vector<std::uint8_t> mask(length, 1);
  std::vector<std::int32_t> out(1);
  CHECK_THROWS_WITH_AS(mask_to_lengths(mask, 1, length, out), doctest::Contains("2147483651 valid tokens"), value_error);
}

TEST_CASE("non-finite values: propagated by default, reported in checked mode") {
  using E = adapter<float>;
  std::vector<float> x(2 * 2 * 4, 0.5f), y(x.size()), dx(x.size());
  x[5] = std::numeric_limits<float>::quiet_NaN();  // example 0, token 1, feature 1
  auto xs = make_tokens<const float>(x.data(), 2, 2, 4);
  layer<E, 2> unchecked{E{4, 2}};
  unchecked.forward(xs, y);
  CHECK(std::isnan(y[5]));
  layer<E, 2> checked{E{4, 2}, {.check_finite = true}};
  CHECK_THROWS_WITH_AS(checked.forward(xs, y), doctest::Contains("x holds nan at example 0, token 1, feature 1"),
                       numeric_error);
  x[5] = 0.5f;
  checked.forward(xs, y);
  auto dy = y;
  dy[3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(checked.backward(dy, dx), doctest::Contains("dy holds inf at example 0, token 0, feature 3"),
                       numeric_error);
}

TEST_CASE("checked mode: only what the result reads, named, and nothing changes on a throw") {
  using E = adapter<double>;
  const std::size_t B = 2, L = 3, d = 4;
  std::vector<double> x(B * L * d), y(x.size()), dx(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.1 * std::sin(static_cast<double>(i));
  const std::vector<std::int32_t> lengths{2, 3};
  auto xs = make_tokens<const double>(x.data(), B, L, d, lengths);
  layer<E, 3> block{E{d, 2}, {.check_finite = true}, 7};

  SUBCASE("a NaN in a padding row cannot affect the result: not reported (masked mean)") {
    x[2 * d + 1] = std::numeric_limits<double>::quiet_NaN();  // example 0, token 2 (padding)
    block.forward(xs, y);
    for (double v : y) CHECK(std::isfinite(v));
    std::vector<double> dy(y.size(), 1.0);
    dy[2 * d] = std::numeric_limits<double>::infinity();  // padding row of dy: ignored too
    block.backward(dy, dx);
  }
  SUBCASE("a router pooling over every position reads padding rows: reported") {
    layer<E, 3> mean{E{d, 2}, {.router = {.pool = pooling::mean}, .check_finite = true}, 7};
    x[2 * d + 1] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH_AS(mean.forward(xs, y), doctest::Contains("x holds nan at example 0, token 2"), numeric_error);
  }
  SUBCASE("a non-finite parameter is named, before y is written") {
    block.forward(xs, y);  // a forward to go back through
    std::vector<double> dy(y.size(), 0.25);
    const auto slot = find_slot(block.bank().layout(), "up.weight");
    block.bank().values()(2, slot.offset + 5) = std::numeric_limits<double>::infinity();
    std::fill(y.begin(), y.end(), 42.0);
    CHECK_THROWS_WITH_AS(block.forward(xs, y),
                         doctest::Contains("parameter experts.up.weight of expert 2 holds inf at flat index 5"),
                         numeric_error);
    for (double v : y) CHECK(v == 42.0);  // y untouched
    block.bank().values()(2, slot.offset + 5) = 0.0;
    // the refused forward did not end the one before: its backward still runs
    block.backward(dy, dx);
    block.router().values()[0] = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_WITH_AS(block.forward(xs, y), doctest::Contains("parameter router.layer_norm.weight holds nan"),
                         numeric_error);
  }
  SUBCASE("a refused backward changes no gradient and can be retried") {
    block.forward(xs, y);
    block.zero_grad();
    std::vector<double> dy(y.size(), 0.25);
    dy[d + 2] = std::numeric_limits<double>::quiet_NaN();  // example 0, token 1: valid
    std::ranges::fill(dx, 7.0);
    CHECK_THROWS_WITH_AS(block.backward(dy, dx), doctest::Contains("dy holds nan at example 0, token 1, feature 2"),
                         numeric_error);
    for (double v : dx) CHECK(v == 7.0);
    for (const auto& p : block.parameters())
      for (double g : p.grad) CHECK(g == 0.0);
    dy[d + 2] = 0.25;
    block.backward(dy, dx);  // still pending
  }
}

namespace {

/// An expert that throws from forward when given more than `limit` rows.
template <class T>
struct picky_expert : archetypes::mergeable_expert<T> {
  using archetypes::mergeable_expert<T>::mergeable_expert;
  std::size_t limit = 2;
  template <class Backend>
  void forward(Backend be, std::span<const T> params, matrix_ref<const T> x, matrix_ref<T> y,
               std::span<T> saved) const {
    if (x.rows > limit) throw value_error("picky_expert: too many rows");
    archetypes::mergeable_expert<T>::forward(be, params, x, y, saved);
  }
};

}  // namespace

TEST_CASE("an expert's exception reaches the caller from the threaded loop") {
  constexpr std::size_t B = 64, L = 4, d = 4096;  // enough work for the batch to be threaded
  layer<picky_expert<float>, 2, backend::cpu> block{picky_expert<float>{d}, {}, 1};
  std::vector<float> x(B * L * d, 0.5f), y(x.size());
  std::vector<std::int32_t> len(B, 2);
  len[37] = 3;
  CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), B, L, d, len), y),
                       "picky_expert: too many rows", value_error);
  len[37] = 2;
  block.forward(make_tokens<const float>(x.data(), B, L, d, len), y);
}
