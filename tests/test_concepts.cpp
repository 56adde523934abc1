// The concepts accept what they promise and nothing less; every algorithm runs with the
// archetype that meets exactly its concept.

#include <doctest/doctest.h>

#include <smear/smear.hpp>

#include "support/testing.hpp"

using namespace smear;

static_assert(expert<archetypes::forward_expert<float>>);
static_assert(!differentiable_expert<archetypes::forward_expert<float>>);
static_assert(differentiable_expert<archetypes::differentiable_expert<float>>);
static_assert(!mergeable_expert<archetypes::differentiable_expert<float>>);
static_assert(mergeable_expert<archetypes::mergeable_expert<float>>);
static_assert(mergeable_expert<archetypes::mergeable_expert<double>>);
static_assert(mergeable_expert<adapter<float>> && mergeable_expert<adapter<double>>);
static_assert(mergeable_expert<lora<float>> && mergeable_expert<linear<double>>);
static_assert(is_residual_expert<adapter<float>>);
static_assert(!is_residual_expert<lora<float>> && !is_residual_expert<linear<float>>);
static_assert(!is_residual_expert<archetypes::mergeable_expert<float>>);
// the optional flags: absent or false is false, true is true
static_assert(is_row_wise_expert<adapter<float>> && is_row_wise_expert<lora<double>> && is_row_wise_expert<linear<float>>);
static_assert(!is_row_wise_expert<conv_adapter<float>> && !is_row_wise_expert<archetypes::mergeable_expert<float>>);
namespace {
struct flags_false : adapter<float> {
  static constexpr bool residual = false, row_wise = false;
  using adapter::adapter;
};
}  // namespace
static_assert(!is_residual_expert<flags_false> && !is_row_wise_expert<flags_false>);

namespace {
struct int_expert {  // value_type must be float or double
  using value_type = int;
};
}  // namespace
static_assert(!expert<int_expert>);

// the host kernel set (smear/backend_concepts.hpp): the shipped backends and any tag deriving
// from reference have it; an unrelated tag has none
static_assert(host_kernel_set<backend::reference, float> && host_kernel_set<backend::cpu, double>);
namespace {
struct derived_backend : backend::cpu {};
struct unrelated_backend {};
}  // namespace
static_assert(host_kernel_set<derived_backend, float>);
static_assert(!host_kernel_set<unrelated_backend, float>);

TEST_CASE_TEMPLATE("every algorithm runs with the mergeable archetype", T, float, double) {
  using E = archetypes::mergeable_expert<T>;
  expert_bank<E, 3> bank{E{4}};
  rng gen{1};
  bank.initialize(gen);
  CHECK(bank.tensor(2, "scale").size() == 4);
  CHECK_THROWS_AS(bank.tensor(0, "nope"), value_error);

  auto run = [](auto block) {
    rng g{2};
    const auto x = testing::random_vector<T>(2 * 3 * 4, g);
    std::vector<T> y(x.size()), dx(x.size());
    std::vector<std::int32_t> lengths{3, 2};
    block.forward(make_tokens<const T>(x.data(), 2, 3, 4, lengths), y);
    block.backward(y, dx);
    adamw<T> opt{block.parameters()};
    opt.step();
    sgd<T> opt2{block.parameters()};
    opt2.step();
    return y;
  };
  const auto y0 = run(layer<E, 3, backend::reference>{E{4}, {}, 5});
  const auto y1 = run(layer<E, 3, backend::cpu>{E{4}, {}, 5});
  CHECK(testing::relative_error(y1, y0) < testing::tolerance<T>());
}
