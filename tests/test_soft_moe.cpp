// Soft MoE (the official code's soft_input_routing): exact gradients against finite
// differences for every row-wise expert, the output against the formulas computed here with
// plain loops, cpu against reference, its options, the refusal of a convolutional expert.

#include <doctest/doctest.h>

#include <cmath>
#include <smear/smear.hpp>
#include <vector>

#include "support/testing.hpp"

using namespace smear;
using smear::testing::random_vector;

namespace {

const std::vector<std::int32_t> ragged{4, 2, 3};
constexpr std::size_t B = 3, L = 4;

layer_options soft(std::size_t slots, bool residual) {
  return {.routing = {.strategy = strategy::soft_moe, .soft_slots = slots}, .residual = residual};
}

template <class Expert, std::size_t N>
void check_gradients(const Expert& e, std::size_t slots, bool residual, std::uint64_t seed) {
  INFO("slots " << slots << ", residual " << residual);
  layer<Expert, N, backend::reference> block{e, soft(slots, residual), seed};
  testing::check_reports(testing::check_layer(block, B, L, ragged, seed));
  const std::vector<std::int32_t> full;  // every example full length
  testing::check_reports(testing::check_layer(block, B, L, full, seed + 1));
}

/// Soft MoE of example b by the file comment of smear/routing/soft_moe.hpp, in plain loops:
/// S, D (over the valid tokens), C, the slot inputs, the experts on each slot row, y.
template <class Layer>
std::vector<double> by_hand(const Layer& block, const std::vector<double>& x, std::span<const std::int32_t> lengths) {
  constexpr std::size_t N = Layer::experts;
  const auto& sm = block.soft_moe();
  const std::size_t d = block.input_dim(), dout = block.output_dim(), s = sm.slots(), J = N * s;
  const auto phi = sm.values().first(d * J);
  const auto scale = sm.values().subspan(d * J, J);
  const auto& ex = block.expert();
  std::vector<double> y(B * L * dout, 0.0);
  for (std::size_t b = 0; b < B; ++b) {
    const std::size_t Lb = static_cast<std::size_t>(lengths[b]);
    const double* xb = x.data() + b * L * d;
    std::vector<double> S(Lb * J), D(Lb * J), C(Lb * J);
    for (std::size_t j = 0; j < J; ++j) {
      double pn = 0;
      for (std::size_t i = 0; i < d; ++i) pn += phi[i * J + j] * phi[i * J + j];
      pn = std::sqrt(pn);
      for (std::size_t m = 0; m < Lb; ++m) {
        double xn = 0, dot = 0;
        for (std::size_t i = 0; i < d; ++i) xn += xb[m * d + i] * xb[m * d + i], dot += xb[m * d + i] * phi[i * J + j];
        S[m * J + j] = dot / ((std::sqrt(xn) + 1e-6) * (pn + 1e-6)) * scale[j];
      }
    }
    for (std::size_t j = 0; j < J; ++j) {
      double z = 0;
      for (std::size_t m = 0; m < Lb; ++m) z += std::exp(S[m * J + j]);
      for (std::size_t m = 0; m < Lb; ++m) D[m * J + j] = std::exp(S[m * J + j]) / z;
    }
    for (std::size_t m = 0; m < Lb; ++m) {
      double z = 0;
      for (std::size_t j = 0; j < J; ++j) z += std::exp(S[m * J + j]);
      for (std::size_t j = 0; j < J; ++j) C[m * J + j] = std::exp(S[m * J + j]) / z;
    }
    for (std::size_t j = 0; j < J; ++j) {
      std::vector<double> xs(d, 0.0), os(dout), saved(ex.saved_size(1));
      for (std::size_t m = 0; m < Lb; ++m)
        for (std::size_t i = 0; i < d; ++i) xs[i] += D[m * J + j] * xb[m * d + i];
      ex.forward(backend::reference{}, std::span<const double>(block.bank().values().row(j / s)),
                 matrix_ref<const double>{xs.data(), 1, d}, matrix_ref<double>{os.data(), 1, dout},
                 std::span<double>(saved));
      for (std::size_t m = 0; m < Lb; ++m)
        for (std::size_t i = 0; i < dout; ++i) y[(b * L + m) * dout + i] += C[m * J + j] * os[i];
    }
    if (block.residual())
      for (std::size_t m = 0; m < Lb; ++m)
        for (std::size_t i = 0; i < d; ++i) y[(b * L + m) * dout + i] += xb[m * d + i];
  }
  return y;
}

using testing::randomise;

}  // namespace

TEST_CASE("soft_moe: every gradient matches finite differences (row-wise experts, s = 1 and 2)") {
  rng gen{7};
  for (std::size_t slots : {1u, 2u})
    for (bool residual : {true, false}) {
      SUBCASE("adapter") { check_gradients<adapter<double>, 3>(adapter<double>{5, 2, {.up_bias = true}}, slots, residual, 11); }
      SUBCASE("lora over a frozen map") {
        check_gradients<lora<double>, 3>(lora<double>{5, 5, 2, random_vector<double>(25, gen)}, slots, residual, 12);
      }
      SUBCASE("linear") { check_gradients<linear<double>, 2>(linear<double>{4, 4}, slots, residual, 13); }
    }
  SUBCASE("linear d_in != d_out, one expert") {
    check_gradients<linear<double>, 1>(linear<double>{4, 3}, 2, false, 14);
  }
}

TEST_CASE("soft_moe: the output is the formulas' (plain loops), padding rows zero, routing the combine share") {
  rng gen{21};
  const auto x = random_vector<double>(B * L * 5, gen);
  for (std::size_t slots : {1u, 2u})
    for (bool residual : {true, false}) {
      INFO("slots " << slots << ", residual " << residual);
      layer<adapter<double>, 3, backend::reference> ref{adapter<double>{5, 3}, soft(slots, residual), 3};
      randomise(ref, gen, 0.5);
      layer<adapter<double>, 3, backend::cpu> cpu{adapter<double>{5, 3}, soft(slots, residual), 3};
      REQUIRE(testing::copy_parameters(ref, cpu) == ref.parameters().size());
      std::vector<double> y(B * L * 5, 9.0), y_cpu(y.size(), 9.0);
      const auto xs = make_tokens<const double>(x.data(), B, L, 5, ragged);
      ref.forward(xs, y);
      const auto expected = by_hand(ref, x, ragged);
      CHECK(testing::relative_error(y, expected) < 1e-12);
      for (std::size_t b = 0; b < B; ++b)
        for (std::size_t i = static_cast<std::size_t>(ragged[b]) * 5; i < L * 5; ++i) CHECK(y[b * L * 5 + i] == 0.0);
      cpu.forward(xs, y_cpu);
      CHECK(testing::relative_error(y_cpu, y) < 1e-12);
      const auto p = ref.routing();
      REQUIRE(p.rows == B);
      REQUIRE(p.cols == 3);
      for (std::size_t b = 0; b < B; ++b) {
        double sum = 0;
        for (std::size_t n = 0; n < 3; ++n) sum += p(b, n);
        CHECK(sum == doctest::Approx(1.0));
      }
    }
}

TEST_CASE("soft_moe: options, parameters and errors") {
  using A = adapter<float>;
  CHECK(parse_strategy("soft_moe").strategy == strategy::soft_moe);
  CHECK_THROWS_WITH_AS((layer<A, 4>{A{4, 2}, {.routing = {.strategy = strategy::soft_moe, .soft_slots = 0}}}),
                       "soft_moe: soft_slots (slots per expert) must be at least 1, got 0", value_error);
  CHECK_THROWS_WITH_AS((layer<conv_adapter<float>, 2>{conv_adapter<float>{2, 2, 4, 2}, soft(1, true)}),
                       doctest::Contains("soft_moe"), value_error);
  layer<A, 4> block{A{6, 2}, soft(2, true), 5};
  CHECK_FALSE(block.uses_router());
  std::vector<std::string> names;
  for (const auto& p : block.parameters()) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"experts", "soft_moe.weight", "soft_moe.scale"});
  const auto& sm = block.soft_moe();
  CHECK(sm.values().size() == 6 * 4 * 2 + 4 * 2);
  for (std::size_t j = 0; j < 8; ++j) CHECK(sm.values()[6 * 8 + j] == 1.0f);  // scale starts at 1
  CHECK(block.describe().str().find("soft_moe.slots=2") != std::string::npos);
  layer<A, 4> smear_block{A{6, 2}};
  CHECK_THROWS_AS(smear_block.soft_moe(), state_error);

  std::vector<float> x(2 * 3 * 6, 0.5f), y(x.size()), dx(x.size());
  block.forward(make_tokens<const float>(x.data(), 2, 3, 6), y);
  block.backward(y, dx);
  bool any = false;
  for (float g : block.soft_moe().gradients()) any = any || g != 0.0f;
  CHECK(any);
  block.zero_grad();
  for (float g : block.soft_moe().gradients()) CHECK(g == 0.0f);
}
