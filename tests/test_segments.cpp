// Causal segment routing (router_options::segment_length): exact gradients, the equivalences
// with per-example SMEAR, causality, decoding one token at a time, checkpoints and errors.

#include <doctest/doctest.h>

#include <filesystem>
#include <limits>
#include <smear/io/checkpoint.hpp>
#include <smear/smear.hpp>

#include "support/testing.hpp"

using namespace smear;
using smear::testing::random_vector;

namespace {

using E = adapter<double>;
template <std::size_t N>
using ref_layer = layer<E, N, backend::reference>;

layer_options segmented(std::size_t length, strategy_options s = {}) {
  layer_options o;
  o.router.segment_length = length;
  o.routing = s;
  return o;
}

using testing::randomise;

}  // namespace

TEST_CASE("segment routing: every gradient against finite differences") {
  // L = 6 in segments of 2: example 1 ends inside its second segment, example 2 fills only its
  // first token, so some units have no valid token
  const std::vector<std::int32_t> ragged{6, 3, 1};
  const auto check = [&](auto& block, std::uint64_t seed) {
    testing::check_reports(testing::check_layer(block, 3, 6, ragged, seed));
  };
  SUBCASE("smear") {
    ref_layer<3> block{E{5, 2}, segmented(2), 1};
    check(block, 2);
  }
  SUBCASE("smear, plain mean over padding, no LayerNorm, normalised weights without bias") {
    auto o = segmented(2);
    o.router.pool = pooling::mean;
    o.router.layer_norm = false;
    o.router.normalize_weights = true;
    o.router.bias = false;
    ref_layer<3> block{E{5, 2}, o, 3};
    check(block, 4);
  }
  SUBCASE("one segment per example: every unit is routed by the prior") {
    ref_layer<2> block{E{4, 2}, segmented(6), 5};
    check(block, 6);
  }
  SUBCASE("ensemble and the switch top-2") {
    ref_layer<3> ens{E{5, 2}, segmented(3, {.strategy = strategy::ensemble}), 7};
    check(ens, 8);
    ref_layer<3> sw{E{5, 2},
                    segmented(2, {.strategy = strategy::top_k, .k = 2, .estimator = estimator::switch_gate}), 9};
    check(sw, 10);
  }
  SUBCASE("DSelect-k") {
    ref_layer<4> block{E{5, 2}, segmented(2, {.strategy = strategy::top_k, .estimator = estimator::dselect}), 11};
    check(block, 12);
  }
  SUBCASE("detached router input: the prior still learns") {
    auto o = segmented(2);
    o.router.detach_input = true;
    ref_layer<3> block{E{5, 2}, o, 13};
    auto reports = testing::check_layer(block, 3, 6, ragged, 14);
    std::erase_if(reports, [](const auto& r) { return r.what == "input"; });  // detached on purpose
    testing::check_reports(reports);
  }
}

TEST_CASE("segment routing: segment s is per-example SMEAR routed by segment s - 1") {
  constexpr std::size_t B = 3, ell = 4, d = 6;
  rng gen{21};
  ref_layer<4> seg{E{d, 3}, segmented(ell), 22};
  ref_layer<4> plain{E{d, 3}, {}, 22};  // the same bank and router weights: the prior is drawn last
  randomise(seg, gen, 0.5);
  REQUIRE(testing::copy_parameters(seg, plain) == plain.parameters().size());  // all but the prior
  plain.invalidate_cache();
  seg.train(false);
  plain.train(false);
  const auto x = random_vector<double>(B * 2 * ell * d, gen);
  std::vector<double> y(x.size());
  seg.forward(make_tokens<const double>(x.data(), B, 2 * ell, d), y);
  const auto p_seg = seg.routing();
  REQUIRE(p_seg.rows == 2 * B);

  // segment 0 of every example is routed by the same prior
  for (std::size_t b = 1; b < B; ++b)
    for (std::size_t e = 0; e < 4; ++e) CHECK(p_seg(2 * b, e) == p_seg(0, e));

  // segment 1: route the segment-0 tokens per example, then run segment 1 through that merge
  std::vector<double> first(B * ell * d), second(B * ell * d), y0(first.size()), y1(first.size());
  for (std::size_t b = 0; b < B; ++b) {
    std::copy_n(x.data() + (2 * b) * ell * d, ell * d, first.data() + b * ell * d);
    std::copy_n(x.data() + (2 * b + 1) * ell * d, ell * d, second.data() + b * ell * d);
  }
  plain.forward(make_tokens<const double>(first.data(), B, ell, d), y0);
  std::vector<double> table(plain.routing().data, plain.routing().data + B * 4);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t e = 0; e < 4; ++e) CHECK(p_seg(2 * b + 1, e) == doctest::Approx(table[b * 4 + e]).epsilon(1e-14));
  plain.set_task_routing({table.data(), B, 4});
  const std::vector<std::int32_t> tags{0, 1, 2};
  plain.forward(make_tokens<const double>(second.data(), B, ell, d), y1, {.tags = tags});
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t i = 0; i < ell * d; ++i)
      CHECK(y[(2 * b + 1) * ell * d + i] == doctest::Approx(y1[b * ell * d + i]).epsilon(1e-13));
}

TEST_CASE("segment routing with one segment per example is SMEAR routed by the prior alone") {
  constexpr std::size_t B = 3, L = 5, d = 6;
  rng gen{25};
  ref_layer<4> seg{E{d, 3}, segmented(L), 26};
  ref_layer<4> plain{E{d, 3}, {}, 26};
  randomise(seg, gen, 0.5);
  REQUIRE(testing::copy_parameters(seg, plain) == plain.parameters().size());  // all but the prior
  plain.invalidate_cache();
  const auto r = seg.router().values();
  const std::vector<double> prior(r.begin() + static_cast<std::ptrdiff_t>(seg.router().segment_prior_offset()),
                                  r.begin() + static_cast<std::ptrdiff_t>(seg.router().segment_prior_offset() + d));
  seg.train(false);
  plain.train(false);
  // the plain router's distribution for an input whose pooled vector is the prior
  std::vector<double> out(d);
  plain.forward(make_tokens<const double>(prior.data(), 1, 1, d), out);
  const std::vector<double> p(plain.routing().data, plain.routing().data + 4);
  const std::vector<std::int32_t> lengths{5, 2, 4};
  const auto x = random_vector<double>(B * L * d, gen);
  std::vector<double> y(x.size()), want(x.size());
  seg.forward(make_tokens<const double>(x.data(), B, L, d, lengths), y);
  plain.set_task_routing({p.data(), 1, 4});
  const std::vector<std::int32_t> tags(B, 0);
  plain.forward(make_tokens<const double>(x.data(), B, L, d, lengths), want, {.tags = tags});
  for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == doctest::Approx(want[i]).epsilon(1e-13));
}

TEST_CASE("segment routing is causal: a token changes only its own output before the next segment") {
  constexpr std::size_t B = 2, L = 12, ell = 4, d = 5;
  rng gen{31};
  for (auto s : {strategy_options{}, strategy_options{.strategy = strategy::ensemble}}) {
    ref_layer<3> block{E{d, 2}, segmented(ell, s), 32};
    randomise(block, gen, 0.5);
    block.train(false);
    const auto x = random_vector<double>(B * L * d, gen);
    std::vector<double> y(x.size()), y2(x.size());
    block.forward(make_tokens<const double>(x.data(), B, L, d), y);
    for (std::size_t t : {0u, 5u, 7u}) {  // a token of segment 0, and two of segment 1
      auto x2 = x;
      x2[(1 * L + t) * d + 2] += 0.75;  // example 1
      block.forward(make_tokens<const double>(x2.data(), B, L, d), y2);
      const std::size_t next = (t / ell + 1) * ell;
      for (std::size_t u = 0; u < L; ++u) {
        bool same = true, differs = false;
        for (std::size_t j = 0; j < d; ++j) {
          same = same && y2[(1 * L + u) * d + j] == y[(1 * L + u) * d + j];
          differs = differs || y2[(1 * L + u) * d + j] != y[(1 * L + u) * d + j];
        }
        if (u < next && u != t) CHECK_MESSAGE(same, "token ", t, " changed output ", u);
        if (u == t || (u >= next && u < next + ell)) CHECK_MESSAGE(differs, "token ", t, " did not reach ", u);
      }
      for (std::size_t i = 0; i < L * d; ++i) CHECK(y2[i] == y[i]);  // example 0 untouched
    }
  }
}

TEST_CASE("segment routing: cpu equals reference, training and evaluation") {
  using F = adapter<float>;
  rng gen{41};
  for (bool train : {true, false}) {
    layer<F, 4, backend::reference> ref{F{16, 4}, segmented(3), 42};
    layer<F, 4, backend::cpu> cpu{F{16, 4}, segmented(3), 42};
    ref.train(train);
    cpu.train(train);
    const std::vector<std::int32_t> lens{9, 4, 1, 7};
    const auto x = random_vector<float>(4 * 9 * 16, gen), dy = random_vector<float>(x.size(), gen);
    std::vector<float> y1(x.size()), y2(x.size()), dx1(x.size()), dx2(x.size());
    ref.forward(make_tokens<const float>(x.data(), 4, 9, 16, lens), y1);
    cpu.forward(make_tokens<const float>(x.data(), 4, 9, 16, lens), y2);
    ref.backward(dy, dx1);
    cpu.backward(dy, dx2);
    for (std::size_t i = 0; i < y1.size(); ++i) {
      CHECK(y2[i] == doctest::Approx(y1[i]).epsilon(1e-5));
      CHECK(dx2[i] == doctest::Approx(dx1[i]).epsilon(1e-4));
    }
    auto g1 = ref.router().gradients(), g2 = cpu.router().gradients();
    for (std::size_t i = 0; i < g1.size(); ++i) CHECK(g2[i] == doctest::Approx(g1[i]).epsilon(1e-4).scale(1e-3));
  }
}

TEST_CASE("segment routing: options, shapes and checkpoints") {
  SUBCASE("a strategy without a router is refused") {
    CHECK_THROWS_WITH_AS((ref_layer<2>{E{4, 2}, segmented(2, {.strategy = strategy::tag}), 1}),
                         doctest::Contains("strategy tag has no router"), value_error);
  }
  SUBCASE("L must be a multiple of the segment length") {
    ref_layer<2> block{E{4, 2}, segmented(3), 1};
    std::vector<double> x(2 * 5 * 4), y(x.size());
    CHECK_THROWS_WITH_AS(block.forward(make_tokens<const double>(x.data(), 2, 5, 4), y),
                         doctest::Contains("multiple of the segment length 3"), shape_error);
  }
  SUBCASE("the prior is a router tensor, saved, loaded and recorded in the architecture") {
    ref_layer<2> block{E{4, 2}, segmented(2), 3};
    const auto params = block.parameters();
    bool found = false;
    for (const auto& p : params) found = found || (p.name == "router.segment_prior" && p.value.size() == 4);
    CHECK(found);
    const auto path = std::filesystem::temp_directory_path() / "smear_test_segments.safetensors";
    save(path, block);
    ref_layer<2> back{E{4, 2}, segmented(2), 99};
    load(path, back);
    CHECK(std::ranges::equal(back.router().values(), block.router().values()));
    ref_layer<2> other{E{4, 2}, segmented(4), 99};
    CHECK_THROWS_WITH_AS(load(path, other), doctest::Contains("router.segment_length"), io_error);
    ref_layer<2> plain{E{4, 2}, {}, 99};
    CHECK_THROWS_AS(load(path, plain), io_error);
    std::filesystem::remove(path);
  }
}

TEST_CASE_TEMPLATE("segment routing: decoding one token at a time equals the whole-sequence forward", Backend,
                   backend::reference, backend::cpu) {
  constexpr std::size_t B = 3, L = 10, ell = 4, d = 6;
  rng gen{51};
  for (auto s : {strategy_options{}, strategy_options{.strategy = strategy::ensemble},
                 strategy_options{.strategy = strategy::top_k, .k = 2, .estimator = estimator::switch_gate}}) {
    // L = 10 is not a multiple of 4: the whole-sequence forward runs the first 8 tokens, and
    // decoding goes on past them into a third segment, checked against a forward of 12
    layer<E, 3, Backend> block{E{d, 3}, segmented(ell, s), 52};
    randomise(block, gen, 0.5);
    block.train(false);
    const auto x = random_vector<double>(B * 12 * d, gen);
    std::vector<double> y(x.size());
    block.forward(make_tokens<const double>(x.data(), B, 12, d), y);
    typename layer<E, 3, Backend>::decoder dec{block, B};
    std::vector<double> xt(B * d), yt(B * d);
    for (std::size_t t = 0; t < L; ++t) {
      for (std::size_t b = 0; b < B; ++b) std::copy_n(x.data() + (b * 12 + t) * d, d, xt.data() + b * d);
      dec.step(xt, yt);
      for (std::size_t b = 0; b < B; ++b)
        for (std::size_t j = 0; j < d; ++j) {
          const double want = y[(b * 12 + t) * d + j];
          if constexpr (std::is_same_v<Backend, backend::reference>)
            CHECK(yt[b * d + j] == want);
          else
            CHECK(yt[b * d + j] == doctest::Approx(want).epsilon(1e-12));
        }
    }
    CHECK(dec.position() == L);
    CHECK(dec.merges() == 3);  // one per segment begun
    // new parameters mid-segment: the decoder merges again, as a forward with them would route
    block.bank().values()(0, 0) += 0.5;
    block.forward(make_tokens<const double>(x.data(), B, 12, d), y);
    for (std::size_t b = 0; b < B; ++b) std::copy_n(x.data() + (b * 12 + L) * d, d, xt.data() + b * d);
    dec.step(xt, yt);
    CHECK(dec.merges() == 4);
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t j = 0; j < d; ++j) CHECK(yt[b * d + j] == doctest::Approx(y[(b * 12 + L) * d + j]).epsilon(1e-12));
  }
}

TEST_CASE("segment routing: the decoder's errors") {
  ref_layer<2> plain{E{4, 2}, {}, 1};
  CHECK_THROWS_WITH_AS((ref_layer<2>::decoder{plain, 2}), doctest::Contains("segment_length > 0"), value_error);
  ref_layer<2> block{E{4, 2}, segmented(2), 1};
  ref_layer<2>::decoder dec{block, 2};
  std::vector<double> x(8), y(8), small(4);
  CHECK_THROWS_AS(dec.step(x, y), state_error);  // training mode
  block.train(false);
  CHECK_THROWS_AS(dec.step(small, y), shape_error);
  dec.step(x, y);
  CHECK(dec.position() == 1);

  auto o = segmented(2);
  o.check_finite = true;
  ref_layer<2> checked{E{4, 2}, o, 2};
  checked.train(false);
  ref_layer<2>::decoder cd{checked, 2};
  x[5] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH_AS(cd.step(x, y), doctest::Contains("x holds nan at flat index 5"), numeric_error);
  CHECK(cd.position() == 0);
  x[5] = 0;
  checked.bank().values()(1, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(cd.step(x, y), doctest::Contains("of expert 1 holds inf"), numeric_error);
  CHECK(cd.position() == 0);
}
