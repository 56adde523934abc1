// The convolutional adapter: forward against a direct convolution, backward against finite
// differences (double, reference backend), cpu against reference (float), inside a SMEAR layer,
// and the NCHW ↔ NHWC layout helpers.

#include <doctest/doctest.h>

#include <smear/smear.hpp>

#include "../support/testing.hpp"

using namespace smear;
using smear::testing::random_vector;

namespace {

/// y[(i, j), o] by the definition: Σ_{u, v, c} x[(i + u - r, j + v - r), c]·W_d[u, v, c, k]
/// + b_d, activation, then the 1×1 up-projection.
std::vector<double> direct_forward(const conv_adapter<double>& e, const std::vector<double>& p,
                                   const std::vector<double>& x) {
  const std::size_t H = e.height(), W = e.width(), d = e.input_dim(), m = e.bottleneck();
  const std::size_t k = e.options().kernel, r = k / 2;
  const double* wd = p.data();
  const double* bd = wd + k * k * d * m;
  const double* wu = bd + m;
  const double* bu = wu + m * d;
  std::vector<double> y(H * W * d, 0.0);
  for (std::size_t i = 0; i < H; ++i)
    for (std::size_t j = 0; j < W; ++j)
      for (std::size_t o = 0; o < m; ++o) {
        double a = bd[o];
        for (std::size_t u = 0; u < k; ++u)
          for (std::size_t v = 0; v < k; ++v) {
            const long si = static_cast<long>(i + u) - static_cast<long>(r);
            const long sj = static_cast<long>(j + v) - static_cast<long>(r);
            if (si < 0 || sj < 0 || si >= static_cast<long>(H) || sj >= static_cast<long>(W)) continue;
            for (std::size_t c = 0; c < d; ++c)
              a += x[(static_cast<std::size_t>(si) * W + static_cast<std::size_t>(sj)) * d + c] *
                   wd[((u * k + v) * d + c) * m + o];
          }
        double h = a;
        if (e.options().act == activation::silu) h = a / (1 + std::exp(-a));
        if (e.options().act == activation::relu) h = std::max(a, 0.0);
        for (std::size_t c = 0; c < d; ++c) y[(i * W + j) * d + c] += h * wu[o * d + c];
      }
  if (e.options().up_bias)
    for (std::size_t q = 0; q < H * W; ++q)
      for (std::size_t c = 0; c < d; ++c) y[q * d + c] += bu[c];
  return y;
}

template <class E>
void run_forward(const E& e, auto be, std::span<const typename E::value_type> p,
                 const std::vector<typename E::value_type>& x, std::vector<typename E::value_type>& y,
                 std::vector<typename E::value_type>& saved) {
  using T = typename E::value_type;
  const std::size_t rows = x.size() / e.input_dim();
  y.assign(rows * e.output_dim(), T(0));
  saved.assign(e.saved_size(rows), T(0));
  e.forward(be, p, matrix_ref<const T>{x.data(), rows, e.input_dim()},
            matrix_ref<T>{y.data(), rows, e.output_dim()}, std::span<T>(saved));
}

/// The expert's parameter and input gradients against central differences, on one whole map.
void check_backward(const conv_adapter<double>& e, std::uint64_t seed) {
  testing::check_reports(testing::check_expert(e, e.positions(), seed));
}

}  // namespace

TEST_CASE("conv_adapter satisfies mergeable_expert and lays out its parameters") {
  static_assert(mergeable_expert<conv_adapter<float>>);
  static_assert(mergeable_expert<conv_adapter<double>>);
  static_assert(is_residual_expert<conv_adapter<float>>);
  conv_adapter<float> e{4, 5, 6, 3, {.up_bias = true}};
  CHECK(e.parameter_count() == layout_size(e.layout()));
  CHECK(e.parameter_count() == 9 * 6 * 3 + 3 + 3 * 6 + 6);
  CHECK(find_slot(e.layout(), "down.weight").shape == std::vector<std::size_t>{3, 3, 6, 3});
}

TEST_CASE("conv_adapter forward is a k×k convolution, the activation and a 1×1 convolution") {
  for (std::size_t k : {1u, 3u, 5u})
    for (auto act : {activation::silu, activation::relu})
      for (bool up_bias : {false, true}) {
        INFO("kernel " << k << " act " << to_string(act) << " up_bias " << up_bias);
        conv_adapter<double> e{4, 3, 5, 2, {.act = act, .kernel = k, .up_bias = up_bias}};
        rng gen{31 + k};
        const auto p = random_vector<double>(e.parameter_count(), gen);
        const auto x = random_vector<double>(e.positions() * 5, gen);
        std::vector<double> y, saved;
        run_forward(e, backend::reference{}, std::span<const double>(p), x, y, saved);
        const auto want = direct_forward(e, p, x);
        CHECK(testing::relative_error(y, want) < 1e-12);
      }
}

TEST_CASE("conv_adapter with a 1×1 kernel computes what adapter computes") {
  const std::size_t d = 6, m = 4;
  conv_adapter<double> conv{3, 3, d, m, {.kernel = 1, .up_bias = true}};
  adapter<double> plain{d, m, {.up_bias = true}};
  REQUIRE(conv.parameter_count() == plain.parameter_count());
  rng gen{41};
  const auto p = random_vector<double>(conv.parameter_count(), gen);
  const auto x = random_vector<double>(9 * d, gen);
  std::vector<double> y0, y1, s0, s1;
  run_forward(conv, backend::reference{}, std::span<const double>(p), x, y0, s0);
  run_forward(plain, backend::reference{}, std::span<const double>(p), x, y1, s1);
  CHECK(testing::relative_error(y0, y1) < 1e-14);
}

TEST_CASE("conv_adapter backward matches finite differences") {
  check_backward(conv_adapter<double>{3, 4, 3, 2}, 51);
  check_backward(conv_adapter<double>{1, 1, 4, 3}, 52);
  check_backward(conv_adapter<double>{5, 2, 2, 3, {.act = activation::gelu, .kernel = 5, .up_bias = true}}, 53);
  check_backward(conv_adapter<double>{2, 3, 3, 2, {.act = activation::identity, .kernel = 1}}, 54);
}

TEST_CASE("conv_adapter: cpu backend equals reference") {
  for (auto [H, W, d, m] : {std::array<std::size_t, 4>{1, 1, 3, 2}, {4, 4, 16, 4}, {7, 5, 13, 6},
                            {8, 8, 32, 8}}) {
    INFO("map " << H << "x" << W << " d " << d << " m " << m);
    conv_adapter<float> e{H, W, d, m, {.up_bias = true}};
    rng gen{61};
    const std::size_t rows = e.positions();
    const auto params = random_vector<float>(e.parameter_count(), gen, 0.3);
    const auto x = random_vector<float>(rows * d, gen);
    const auto dy = random_vector<float>(rows * d, gen);
    auto run = [&](auto be, std::vector<float>& y, std::vector<float>& dx, std::vector<float>& dp) {
      std::vector<float> saved, scratch(e.scratch_size(rows));
      run_forward(e, be, std::span<const float>(params), x, y, saved);
      dx.assign(x.size(), 0.f);
      dp.assign(params.size(), 0.f);
      e.backward(be, std::span<const float>(params), matrix_ref<const float>{x.data(), rows, d},
                 std::span<const float>(saved), matrix_ref<const float>{dy.data(), rows, d},
                 matrix_ref<float>{dx.data(), rows, d}, std::span<float>(dp), std::span<float>(scratch));
    };
    std::vector<float> y0, dx0, dp0, y1, dx1, dp1;
    run(backend::reference{}, y0, dx0, dp0);
    run(backend::cpu{}, y1, dx1, dp1);
    const double tol = testing::tolerance<float>() * std::sqrt(static_cast<double>(9 * d + rows));
    CHECK(testing::relative_error(y1, y0) < tol);
    CHECK(testing::relative_error(dx1, dx0) < tol);
    CHECK(testing::relative_error(dp1, dp0) < tol);
  }
}

TEST_CASE("a SMEAR layer of conv adapters: every gradient matches finite differences") {
  const std::size_t B = 3, H = 3, W = 2, C = 3;
  layer<conv_adapter<double>, 4, backend::reference> block{conv_adapter<double>{H, W, C, 2}, {}, 71};
  testing::check_reports(testing::check_layer(block, B, H * W, {}, 72));
}

TEST_CASE("conv_adapter rejects bad dimensions and maps of the wrong size") {
  CHECK_THROWS_AS(conv_adapter<float>(0, 4, 4, 2), value_error);
  CHECK_THROWS_AS(conv_adapter<float>(4, 4, 4, 0), value_error);
  CHECK_THROWS_AS(conv_adapter<float>(4, 4, 4, 2, {.kernel = 2}), value_error);
  conv_adapter<float> e{2, 2, 3, 2};
  std::vector<float> p(e.parameter_count()), x(5 * 3), y(5 * 3), saved(e.saved_size(5));
  CHECK_THROWS_WITH_AS(e.forward(backend::reference{}, std::span<const float>(p),
                                 matrix_ref<const float>{x.data(), 5, 3}, matrix_ref<float>{y.data(), 5, 3},
                                 std::span<float>(saved)),
                       doctest::Contains("[H, W] = [2, 2]"), shape_error);
}

TEST_CASE("nchw_to_nhwc and nhwc_to_nchw are inverse permutations") {
  const map_shape s{2, 3, 4, 5};
  std::vector<float> nchw(s.size());
  for (std::size_t i = 0; i < nchw.size(); ++i) nchw[i] = static_cast<float>(i);
  std::vector<double> nhwc(s.size());
  nchw_to_nhwc(std::span<const float>(nchw), std::span<double>(nhwc), s);
  // element (b=1, c=2, h=3, w=4) lands at token 3·5 + 4 of example 1, feature 2
  CHECK(nhwc[(1 * 20 + 19) * 3 + 2] == static_cast<double>(((1 * 3 + 2) * 4 + 3) * 5 + 4));
  std::vector<float> back(s.size());
  nhwc_to_nchw(std::span<const double>(nhwc), std::span<float>(back), s);
  CHECK(back == nchw);
  std::vector<double> wrong(s.size() - 1);
  CHECK_THROWS_AS(nchw_to_nhwc(std::span<const float>(nchw), std::span<double>(wrong), s), shape_error);
  const auto t = map_tokens<const double>(nhwc.data(), s);
  CHECK(t.batch == 2);
  CHECK(t.length == 20);
  CHECK(t.dim == 3);
}
