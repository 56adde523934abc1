// Optimisers against hand-computed steps.

#include <doctest/doctest.h>

#include <cmath>
#include <smear/smear.hpp>

using namespace smear;

TEST_CASE("adamw: first step moves by lr in the sign of the gradient, decay only where asked") {
  std::vector<double> a{1.0, -2.0}, ga{0.5, -4.0}, b{3.0}, gb{0.25};
  parameter_list<double> params{{"a", a, ga, true}, {"b", b, gb, false}};
  adamw<double> opt{params, {.lr = 0.1, .eps = 1e-12, .weight_decay = 0.5}};
  opt.step();
  // m̂ = g, v̂ = g², so the step is lr·sign(g); decay multiplies by 1 − lr·λ = 0.95
  CHECK(a[0] == doctest::Approx(1.0 * 0.95 - 0.1));
  CHECK(a[1] == doctest::Approx(-2.0 * 0.95 + 0.1));
  CHECK(b[0] == doctest::Approx(3.0 - 0.1));
  // second step with the same gradient: m̂ = g, v̂ = g² again
  opt.step();
  CHECK(b[0] == doctest::Approx(3.0 - 0.2));
  CHECK(opt.steps() == 2);
  opt.zero_grad();
  CHECK(ga[0] == 0.0);
  CHECK(gb[0] == 0.0);
}

TEST_CASE("adamw minimises a quadratic") {
  std::vector<float> x{5.0f, -3.0f}, g(2);
  adamw<float> opt{{{"x", x, g, false}}, {.lr = 0.1}};
  for (int i = 0; i < 500; ++i) {
    for (std::size_t j = 0; j < 2; ++j) g[j] = 2.0f * (x[j] - float(j));
    opt.step();
  }
  CHECK(x[0] == doctest::Approx(0.0).epsilon(0.02));
  CHECK(x[1] == doctest::Approx(1.0).epsilon(0.02));
}

TEST_CASE("sgd with momentum and weight decay") {
  std::vector<double> x{1.0}, g{0.5};
  sgd<double> opt{{{"x", x, g, true}}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.1}};
  opt.step();  // v = 0.5 + 0.1·1 = 0.6; x = 1 − 0.06
  CHECK(x[0] == doctest::Approx(0.94));
  opt.step();  // v = 0.9·0.6 + 0.5 + 0.094 = 1.134; x = 0.94 − 0.1134
  CHECK(x[0] == doctest::Approx(0.94 - 0.1134));
  std::vector<double> y{1.0}, gy{1.0};
  sgd<double> nesterov{{{"y", y, gy, false}}, {.lr = 0.1, .momentum = 0.5, .nesterov = true}};
  nesterov.step();  // v = 1; step = g + μv = 1.5
  CHECK(y[0] == doctest::Approx(1.0 - 0.15));
}

TEST_CASE("optimisers reject bad options and mismatched spans") {
  std::vector<double> x{1.0}, g{0.0, 0.0};
  CHECK_THROWS_AS(adamw<double>({{"x", x, g, true}}), shape_error);
  CHECK_THROWS_AS(sgd<double>({{"x", x, g, true}}), shape_error);
  CHECK_THROWS_AS(adamw<double>({}, {.lr = -1.0}), value_error);
  CHECK_THROWS_AS(adamw<double>({}, {.beta1 = 1.0}), value_error);
  CHECK_THROWS_AS(sgd<double>({}, {.momentum = 1.5}), value_error);
}
