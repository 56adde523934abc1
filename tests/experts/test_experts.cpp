// Every expert: forward against an independent computation of its formula, backward against
// finite differences (double, reference backend), cpu backend against reference (float).

#include <doctest/doctest.h>

#include <smear/smear.hpp>

#include "../support/testing.hpp"

using namespace smear;
using smear::testing::random_vector;

namespace {

/// Finite-difference check of an expert's parameter and input gradients on `rows` rows.
template <class E>
void check_expert_backward(const E& e, std::size_t rows, std::uint64_t seed) {
  testing::check_reports(testing::check_expert(e, rows, seed));
}

/// The cpu backend's forward and backward equal the reference backend's, in float.
template <class E>
void check_cpu_matches_reference(const E& e, std::size_t rows, std::uint64_t seed) {
  using T = typename E::value_type;
  rng gen{seed};
  const auto params = random_vector<T>(e.parameter_count(), gen, 0.3);
  const auto x = random_vector<T>(rows * e.input_dim(), gen);
  const auto dy = random_vector<T>(rows * e.output_dim(), gen);
  auto run = [&](auto be, std::vector<T>& y, std::vector<T>& dx, std::vector<T>& dp) {
    std::vector<T> saved(e.saved_size(rows)), scratch(e.scratch_size(rows));
    y.assign(rows * e.output_dim(), T(0));
    dx.assign(x.size(), T(0));
    dp.assign(params.size(), T(0));
    matrix_ref<const T> xm{x.data(), rows, e.input_dim()};
    e.forward(be, std::span<const T>(params), xm, matrix_ref<T>{y.data(), rows, e.output_dim()},
              std::span<T>(saved));
    e.backward(be, std::span<const T>(params), xm, std::span<const T>(saved),
               matrix_ref<const T>{dy.data(), rows, e.output_dim()},
               matrix_ref<T>{dx.data(), rows, e.input_dim()}, std::span<T>(dp), std::span<T>(scratch));
  };
  std::vector<T> y0, dx0, dp0, y1, dx1, dp1;
  run(backend::reference{}, y0, dx0, dp0);
  run(backend::cpu{}, y1, dx1, dp1);
  const double tol = testing::tolerance<T>() * std::sqrt(static_cast<double>(e.input_dim() + rows));
  CHECK(testing::relative_error(y1, y0) < tol);
  CHECK(testing::relative_error(dx1, dx0) < tol);
  CHECK(testing::relative_error(dp1, dp0) < tol);
}

}  // namespace

TEST_CASE("adapter forward is x·W_d + b_d → act → ·W_u + b_u") {
  for (auto act : {activation::silu, activation::relu, activation::gelu, activation::identity}) {
    for (bool up_bias : {false, true}) {
      const std::size_t d = 5, m = 3, rows = 4;
      adapter<double> e{d, m, {.act = act, .up_bias = up_bias}};
      rng gen{7};
      const auto p = random_vector<double>(e.parameter_count(), gen);
      const auto x = random_vector<double>(rows * d, gen);
      std::vector<double> y(rows * d), saved(e.saved_size(rows));
      e.forward(backend::reference{}, std::span<const double>(p), matrix_ref<const double>{x.data(), rows, d},
                matrix_ref<double>{y.data(), rows, d}, std::span<double>(saved));
      const double* wd = p.data();
      const double* bd = wd + d * m;
      const double* wu = bd + m;
      const double* bu = wu + m * d;
      for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < d; ++j) {
          double out = up_bias ? bu[j] : 0.0;
          for (std::size_t k = 0; k < m; ++k) {
            double a = bd[k];
            for (std::size_t l = 0; l < d; ++l) a += x[i * d + l] * wd[l * m + k];
            double h = a;
            if (act == activation::silu) h = a / (1 + std::exp(-a));
            if (act == activation::relu) h = std::max(a, 0.0);
            if (act == activation::gelu) h = 0.5 * a * (1 + std::erf(a / std::sqrt(2.0)));
            out += h * wu[k * d + j];
          }
          INFO("act " << to_string(act) << " up_bias " << up_bias);
          // gelu is the tanh approximation: within 1e-3 of the exact erf form
          CHECK(y[i * d + j] == doctest::Approx(out).epsilon(act == activation::gelu ? 1e-3 : 1e-12));
        }
      CHECK(e.parameter_count() == layout_size(e.layout()));
    }
  }
}

TEST_CASE("lora forward is x·W0 + b0 + s·(x·A)·B") {
  const std::size_t in = 4, out = 3, r = 2, rows = 3;
  rng gen{3};
  const auto w0 = random_vector<double>(in * out, gen);
  const auto b0 = random_vector<double>(out, gen);
  lora<double> e{in, out, r, w0, b0, {.alpha = 4.0}};
  CHECK(e.scale() == doctest::Approx(2.0));
  const auto p = random_vector<double>(e.parameter_count(), gen);
  const auto x = random_vector<double>(rows * in, gen);
  std::vector<double> y(rows * out), saved(e.saved_size(rows));
  e.forward(backend::reference{}, std::span<const double>(p), matrix_ref<const double>{x.data(), rows, in},
            matrix_ref<double>{y.data(), rows, out}, std::span<double>(saved));
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < out; ++j) {
      double v = b0[j];
      for (std::size_t l = 0; l < in; ++l) v += x[i * in + l] * w0[l * out + j];
      for (std::size_t k = 0; k < r; ++k) {
        double xa = 0;
        for (std::size_t l = 0; l < in; ++l) xa += x[i * in + l] * p[l * r + k];
        v += 2.0 * xa * p[in * r + k * out + j];
      }
      CHECK(y[i * out + j] == doctest::Approx(v).epsilon(1e-12));
    }
  CHECK_THROWS_AS(lora<double>(in, out, r, std::vector<double>(5)), shape_error);
}

TEST_CASE("linear forward is x·W + b") {
  const std::size_t in = 3, out = 2, rows = 2;
  linear<double> e{in, out};
  const std::vector<double> p{1, 2, 3, 4, 5, 6, 0.5, -0.5};
  const std::vector<double> x{1, 0, -1, 2, 1, 0};
  std::vector<double> y(rows * out);
  e.forward(backend::reference{}, std::span<const double>(p), matrix_ref<const double>{x.data(), rows, in},
            matrix_ref<double>{y.data(), rows, out}, {});
  CHECK(y == std::vector<double>{1 - 5 + 0.5, 2 - 6 - 0.5, 2 + 3 + 0.5, 4 + 4 - 0.5});
}

TEST_CASE("every expert's backward matches finite differences") {
  SUBCASE("adapter, each activation, with and without up bias") {
    for (auto act : {activation::silu, activation::relu, activation::gelu, activation::identity})
      for (bool up_bias : {false, true}) {
        INFO("act " << to_string(act) << " up_bias " << up_bias);
        check_expert_backward(adapter<double>{6, 3, {.act = act, .up_bias = up_bias}}, 5, 11);
      }
  }
  SUBCASE("lora with and without a frozen map") {
    rng gen{5};
    check_expert_backward(lora<double>{5, 4, 2, random_vector<double>(20, gen), random_vector<double>(4, gen),
                                       {.alpha = 6.0}},
                          3, 12);
    check_expert_backward(lora<double>{5, 4, 3}, 2, 13);
  }
  SUBCASE("linear with and without bias") {
    check_expert_backward(linear<double>{4, 6}, 3, 14);
    check_expert_backward(linear<double>{4, 6, {.bias = false}}, 1, 15);
  }
  SUBCASE("the differentiable archetype") {
    check_expert_backward(archetypes::differentiable_expert<double>{4}, 3, 16);
  }
}

TEST_CASE("cpu backend equals reference for every expert, odd sizes included") {
  for (std::size_t rows : {1u, 7u, 33u}) {
    INFO("rows " << rows);
    check_cpu_matches_reference(adapter<float>{13, 5}, rows, 21);
    check_cpu_matches_reference(adapter<float>{64, 24, {.act = activation::gelu, .up_bias = true}}, rows, 22);
    check_cpu_matches_reference(adapter<float>{9, 17, {.act = activation::relu}}, rows, 23);
    rng gen{9};
    check_cpu_matches_reference(lora<float>{11, 7, 3, random_vector<float>(77, gen), {}}, rows, 24);
    check_cpu_matches_reference(linear<float>{3, 19}, rows, 25);
    check_cpu_matches_reference(adapter<double>{31, 7}, rows, 26);
  }
}

TEST_CASE("experts reject empty dimensions") {
  CHECK_THROWS_AS(adapter<float>(0, 4), value_error);
  CHECK_THROWS_AS(linear<float>(3, 0), value_error);
  CHECK_THROWS_AS(lora<float>(3, 3, 0), value_error);
}

namespace {

/// An adapter whose backward is wrong by 1% in one parameter: the public checker must see it.
struct wrong_adapter : adapter<double> {
  using adapter<double>::adapter;
  template <class Backend>
  void backward(Backend be, std::span<const double> p, matrix_ref<const double> x, std::span<const double> saved,
                matrix_ref<const double> dy, matrix_ref<double> dx, std::span<double> dp,
                std::span<double> scratch) const {
    adapter<double>::backward(be, p, x, saved, dy, dx, dp, scratch);
    dp[3] *= 1.01;
  }
};

}  // namespace

TEST_CASE("smear::testing::check_expert and check_layer report a wrong gradient") {
  const auto good = testing::check_expert(adapter<double>{5, 3}, 4, 1);
  REQUIRE(good.size() == 2);
  CHECK(good[0].worst < 1e-6);
  const auto bad = testing::check_expert(wrong_adapter{5, 3}, 4, 1);
  CHECK(bad[0].what == "parameters");
  CHECK(bad[0].index == 3);
  CHECK(bad[0].worst > 1e-3);
  CHECK(bad[1].worst < 1e-6);  // the input gradient is right
  layer<wrong_adapter, 2, backend::reference> block{wrong_adapter{5, 3}, {}, 2};
  const std::vector<std::int32_t> lengths{3, 1};
  const auto reports = testing::check_layer(block, 2, 3, lengths, 3);
  CHECK(reports.front().what == "experts");
  CHECK(reports.front().worst > 1e-3);
}
