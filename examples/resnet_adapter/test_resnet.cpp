// The example's network: every gradient (backbone in pre-training mode, routing blocks and head
// in adaptation mode, and the input) against finite differences on a tiny network in double.

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <smear/smear.hpp>

#include "../../tests/support/testing.hpp"
#include "dataset.hpp"
#include "resnet.hpp"

using smear::testing::check_gradient;

namespace {

struct fixture {
  resnet::architecture arch{.image = 6, .width = 2, .blocks = {1, 1}, .stem_stride = 1};
  std::size_t n = 3, classes = 4;
  resnet::network<double> net{arch, classes, 5};
  std::vector<double> images;
  std::vector<std::int32_t> labels{0, 3, 1};
  std::vector<double> dlogits;

  explicit fixture(std::uint64_t seed) {
    smear::rng gen{seed};
    images = smear::testing::random_vector<double>(n * arch.image * arch.image * 3, gen);
    // random batch-norm affine maps and running statistics, so inference mode is not the identity
    for (auto* bn : net.norms())
      for (std::size_t c = 0; c < bn->channels(); ++c) {
        bn->gamma.value[c] = 1 + 0.3 * gen.normal();
        bn->beta.value[c] = 0.3 * gen.normal();
        bn->running_mean[c] = 0.3 * gen.normal();
        bn->running_var[c] = 0.5 + gen.uniform();
      }
  }

  double loss(bool training) {
    const auto& logits = net.forward(images, n, training);
    return resnet::cross_entropy(logits, std::span<const std::int32_t>(labels), classes, dlogits);
  }
};

/// Checks the gradients the network reports for `tensors` and for the images.
void check_all(fixture& f, bool training, const std::vector<smear::parameter<double>>& tensors) {
  f.loss(training);
  f.net.zero_grad();
  const auto dimages = f.net.backward(f.dlogits);
  for (const auto& p : tensors) {
    const std::vector<double> analytic(p.grad.begin(), p.grad.end());
    check_gradient(p.name, p.value, analytic, [&] { return f.loss(training); });
  }
  check_gradient("images", f.images, dimages, [&] { return f.loss(training); });
}

}  // namespace

TEST_CASE("pre-training mode: backbone, head and input gradients match finite differences") {
  fixture f{11};
  check_all(f, true, f.net.parameters(true));
}

void check_adaptation(resnet::adapter_config cfg, std::uint64_t seed) {
  fixture f{seed};
  cfg.reduction = 1;
  f.net.add_routing(cfg, seed);
  smear::rng gen{seed + 1};
  for (auto& b : f.net.blocks) {
    auto& r = *b->route;
    for (auto& v : r.mean) v = 0.2 * gen.normal();
    for (auto& v : r.inv_std) v = 0.5 + gen.uniform();
    // random experts and router
    for (auto& p : r.layer().parameters()) {
      const double scale = p.name == "experts" ? 0.3 : p.name.starts_with("router.") ? 0.5 : 0.0;
      if (scale > 0)
        for (auto& v : p.value) v = scale * gen.normal();
    }
  }
  const auto params = f.net.parameters(false);
  CHECK(params.size() > 2);
  // the frozen backbone must get no gradient
  check_all(f, false, params);
  for (auto* t : f.net.backbone_tensors())
    CHECK(std::all_of(t->grad.begin(), t->grad.end(), [](double g) { return g == 0.0; }));
}

TEST_CASE("adaptation mode: routing blocks, head and input gradients match finite differences") {
  SUBCASE("adapter experts") { check_adaptation({.experts = 6}, 21); }
  SUBCASE("conv adapter experts") { check_adaptation({.conv = true, .experts = 6}, 22); }
  SUBCASE("one expert") { check_adaptation({.experts = 1}, 23); }
  SUBCASE("an expert count that is not compiled") {
    fixture f{24};
    CHECK_THROWS_AS(f.net.add_routing({.experts = 3}, 24), smear::value_error);
  }
}

TEST_CASE("a routing block starts close to the identity and its router sees the pooled map") {
  fixture f{31};
  const auto before = f.net.forward(f.images, f.n, false);
  f.net.add_routing({.experts = 6}, 32);
  const auto after = f.net.forward(f.images, f.n, false);
  CHECK(smear::testing::relative_error(after, before) < 1e-2);
  const auto p = f.net.blocks[0]->route->layer().routing();
  CHECK(p.rows == f.n);
  CHECK(p.cols == 6);
}

TEST_CASE("image files: write, read back, and errors name the file") {
  const auto dir = std::filesystem::temp_directory_path() / "smear-resnet-test-io";
  std::filesystem::create_directories(dir);
  imageset::dataset d = imageset::make_tiny(7, 4, 3, 2, 8);
  imageset::write(dir / "x.bin", d);
  const auto e = imageset::read(dir / "x.bin");
  CHECK(e.count == d.count);
  CHECK(e.labels == d.labels);
  CHECK(e.domains == d.domains);
  CHECK(e.splits == d.splits);
  CHECK(e.pixels == d.pixels);
  CHECK_THROWS_AS(imageset::read(dir / "missing.bin"), smear::io_error);
  std::filesystem::remove_all(dir);
}
