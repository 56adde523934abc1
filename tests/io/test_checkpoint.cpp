// Checkpoints of banks, routers and layers: the naming scheme, bit-exact round trips, reduced
// precision, name maps, several layers per file, and all-or-nothing loading.

#include <doctest/doctest.h>

#include <smear/io/checkpoint.hpp>
#include <smear/smear.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "../support/testing.hpp"

using namespace smear;
namespace fs = std::filesystem;

namespace {

fs::path scratch(const std::string& name) {
  fs::path dir = fs::path(SMEAR_IO_TEST_DIR) / "checkpoint";
  fs::create_directories(dir);
  return dir / name;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
}

template <class T>
std::vector<T> flat(matrix_ref<const T> m) {
  std::vector<T> out;
  for (std::size_t i = 0; i < m.rows; ++i) out.insert(out.end(), m.row(i).begin(), m.row(i).end());
  return out;
}

template <class L>
std::vector<typename L::value_type> bank_values(const L& l) {
  return flat<typename L::value_type>(l.bank().values());
}

template <class L>
std::vector<typename L::value_type> router_values(const L& l) {
  auto v = l.router().values();
  return {v.begin(), v.end()};
}

/// Random values everywhere, so a load that misses a slot or an expert shows.
template <class L>
void randomise(L& l, std::uint64_t seed) {
  rng gen{seed};
  auto b = l.bank().values();
  for (std::size_t i = 0; i < b.rows; ++i)
    for (auto& v : b.row(i)) v = static_cast<typename L::value_type>(gen.normal());
  for (auto& v : l.router().values()) v = static_cast<typename L::value_type>(gen.normal());
}

}  // namespace

TEST_CASE("a layer's checkpoint follows the documented names and shapes") {
  using E = adapter<float>;
  layer<E, 4> block{E{6, 3}, {}, 1};
  randomise(block, 2);
  const auto path = scratch("names.safetensors");
  save(path, block, "block.3.");
  const auto file = safetensors_file::open(path);
  std::vector<std::pair<std::string, std::vector<std::size_t>>> expected{
      {"block.3.experts.down.weight", {4, 6, 3}},
      {"block.3.experts.down.bias", {4, 3}},
      {"block.3.experts.up.weight", {4, 3, 6}},
      {"block.3.router.layer_norm.weight", {6}},
      {"block.3.router.layer_norm.bias", {6}},
      {"block.3.router.weight", {4, 6}},
      {"block.3.router.bias", {4}},
  };
  REQUIRE(file.tensors().size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    CAPTURE(expected[i].first);
    CHECK(file.tensors()[i].name == expected[i].first);
    CHECK(file.tensors()[i].shape == expected[i].second);
    CHECK(file.tensors()[i].type == dtype::f32);
  }
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.metadata().at("smear.version") == "0.1.0");
  // expert e's slot is row e of the stacked tensor
  const auto up = file.read<float>("block.3.experts.up.weight");
  for (std::size_t e = 0; e < 4; ++e) {
    const auto mine = block.bank().tensor(e, "up.weight");
    CHECK(same_bits(std::span<const float>(up).subspan(e * 18, 18), mine));
  }
  CHECK(same_bits(file.read<float>("block.3.router.weight"),
                  block.router().values().subspan(12, 24)));
}

TEST_CASE_TEMPLATE("save then load gives identical bits and identical outputs", T, float, double) {
  using E = adapter<T>;
  const E proto{5, 2, {.up_bias = true}};
  layer<E, 3> saved{proto, {}, 7};
  randomise(saved, 8);
  const auto path = scratch("roundtrip.safetensors");
  save(path, saved);
  layer<E, 3> loaded{proto, {}, 99};
  CHECK_FALSE(same_bits(bank_values(loaded), bank_values(saved)));
  load(path, loaded);
  CHECK(same_bits(bank_values(loaded), bank_values(saved)));
  CHECK(same_bits(router_values(loaded), router_values(saved)));
  CHECK(safetensors_file::open(path).at("experts.down.weight").type == native_dtype<T>);

  rng gen{3};
  const std::size_t B = 2, L = 4;
  auto x = smear::testing::random_vector<T>(B * L * 5, gen);
  std::vector<T> y1(x.size()), y2(x.size());
  saved.train(false);
  loaded.train(false);
  saved.forward(make_tokens<const T>(x.data(), B, L, 5), y1);
  loaded.forward(make_tokens<const T>(x.data(), B, L, 5), y2);
  CHECK(same_bits(y1, y2));
}

TEST_CASE("banks and routers save and load on their own; several layers share a file") {
  using E = linear<double>;
  layer<E, 2> a{E{3, 4}, {}, 1}, b{E{3, 4}, {.router = {.layer_norm = false}}, 2};
  randomise(a, 10);
  randomise(b, 11);
  const auto bank_path = scratch("bank.safetensors");
  const auto router_path = scratch("router.safetensors");
  save(bank_path, a.bank(), "enc.");
  save(router_path, a.router());
  layer<E, 2> c{E{3, 4}, {}, 5};
  load(bank_path, c.bank(), "enc.");
  load(router_path, c.router());
  CHECK(same_bits(bank_values(c), bank_values(a)));
  CHECK(same_bits(router_values(c), router_values(a)));

  safetensors_writer out;
  add(out, a, "blocks.0.");
  add(out, b, "blocks.1.", dtype::f32);
  const auto both = scratch("both.safetensors");
  out.save(both);
  const auto file = safetensors_file::open(both);
  layer<E, 2> a2{E{3, 4}, {}, 20}, b2{E{3, 4}, {.router = {.layer_norm = false}}, 21};
  load(file, a2, "blocks.0.");
  load(file, b2, "blocks.1.");
  CHECK(same_bits(bank_values(a2), bank_values(a)));
  CHECK(smear::testing::relative_error(bank_values(b2), bank_values(b)) < 1e-7);  // through F32
  CHECK_FALSE(file.contains("blocks.1.router.layer_norm.weight"));
}

TEST_CASE("reduced precision: saved as F16 or BF16, converted on load, stable on re-save") {
  using E = adapter<float>;
  layer<E, 2> block{E{4, 2}, {}, 1};
  randomise(block, 4);
  for (dtype type : {dtype::f16, dtype::bf16}) {
    CAPTURE(to_string(type));
    const auto path = scratch("half.safetensors");
    save(path, block, "", {.dtype = type, .metadata = {{"note", "reduced"}}});
    const auto file = safetensors_file::open(path);
    CHECK(file.at("experts.down.weight").type == type);
    CHECK(file.metadata().at("note") == "reduced");
    layer<E, 2> loaded{E{4, 2}, {}, 2};
    load(file, loaded);
    // each value is the nearest representable one
    const auto orig = bank_values(block), got = bank_values(loaded);
    for (std::size_t i = 0; i < orig.size(); ++i) {
      const double expect = type == dtype::f16
                                ? detail::decode_small_float<5, 10>(detail::encode_small_float<5, 10>(orig[i]))
                                : detail::decode_small_float<8, 7>(detail::encode_small_float<8, 7>(orig[i]));
      REQUIRE(static_cast<double>(got[i]) == expect);
    }
    const auto again = scratch("half_again.safetensors");
    save(again, loaded, "", {.dtype = type, .metadata = {{"note", "reduced"}}});
    std::ifstream f1(path, std::ios::binary), f2(again, std::ios::binary);
    const std::string s1{std::istreambuf_iterator<char>(f1), {}}, s2{std::istreambuf_iterator<char>(f2), {}};
    CHECK(s1 == s2);
  }
}

TEST_CASE("a plain adapter block is built from named tensors, set by name for the bank and the router alike") {
  using E = adapter<double>;
  const E proto{4, 2, plain_adapter_options};
  const auto options = plain_options();
  layer<E, 2> source{proto, options, 3};
  randomise(source, 4);
  // the tensors a PyTorch model would hand over, in smear's names (every expert stacked)
  named_tensors<double> t;
  for (const auto& slot : source.bank().layout()) {
    std::vector<double> stacked;
    for (std::size_t e = 0; e < 2; ++e) {
      const auto v = std::as_const(source).bank().tensor(e, slot.name);
      stacked.insert(stacked.end(), v.begin(), v.end());
    }
    std::vector<std::size_t> shape{2};
    shape.insert(shape.end(), slot.shape.begin(), slot.shape.end());
    t.add("experts." + slot.name, stacked, shape);
  }
  std::vector<std::string> router_names;
  for (const auto& slot : source.router().layout()) {
    router_names.push_back(slot.name);
    t.add("router." + slot.name, std::as_const(source).router().tensor(slot.name), slot.shape);
  }
  // the plain preset: ReLU, an up-projection bias, a router without LayerNorm over the plain mean
  CHECK(router_names == std::vector<std::string>{"weight", "bias"});
  CHECK(source.bank().layout().back().name == "up.bias");
  CHECK(source.describe().str().find("expert.activation=relu") != std::string::npos);
  CHECK(source.router().options().pool == pooling::mean);

  layer<E, 2> built{proto, options, 99};
  load(t, built);
  CHECK(same_bits(bank_values(built), bank_values(source)));
  CHECK(same_bits(router_values(built), router_values(source)));
  const std::vector<double> x{0.5, -1, 2, 0.25, 1, 1, -0.5, 3};
  std::vector<double> y1(8), y2(8);
  source.forward(make_tokens(x.data(), 1, 2, 4), y1);
  built.forward(make_tokens(x.data(), 1, 2, 4), y2);
  CHECK(same_bits(y1, y2));

  // set by name: one expert's tensor, one router tensor
  built.bank().tensor(1, "up.bias")[2] = 7.0;
  built.router().tensor("bias")[0] = -3.0;
  CHECK(built.bank()[1][proto.layout().back().offset + 2] == 7.0);
  CHECK(built.router().values()[built.router().layout().back().offset] == -3.0);
  CHECK_THROWS_WITH_AS(built.router().tensor("layer_norm.weight"),
                       "no parameter called 'layer_norm.weight'; the layout has: weight, bias", value_error);

  // a missing or misshapen tensor is refused, the layer left as it was
  named_tensors<double> partial;
  partial.add("experts.down.weight", std::vector<double>(16), {2, 4, 2});
  const auto before = bank_values(built);
  CHECK_THROWS_WITH_AS(load(partial, built), doctest::Contains("has no tensor 'experts.down.bias'"), io_error);
  named_tensors<double> wrong;
  wrong.add("experts.down.weight", std::vector<double>(16), {2, 2, 4});
  CHECK_THROWS_WITH_AS(load(wrong, built), doctest::Contains("has shape [2, 2, 4], the expert bank needs [2, 4, 2]"),
                       io_error);
  CHECK(same_bits(bank_values(built), before));
  CHECK_THROWS_AS(partial.add("experts.down.weight", std::vector<double>(16), {2, 4, 2}), value_error);
}

TEST_CASE("a name map loads files that follow another naming scheme") {
  using E = adapter<float>;
  layer<E, 2> block{E{4, 2}, {}, 1};
  randomise(block, 5);
  // a file with "adapters.<slot>" and "gate.<slot>" instead of "experts." and "router."
  safetensors_writer out;
  safetensors_writer plain;
  add(plain, block);
  const auto plain_file = safetensors_file::parse(plain.serialize());
  for (const auto& t : plain_file.tensors()) {
    std::string n = t.name;
    n = n.starts_with("experts.") ? "adapters." + n.substr(8) : "gate." + n.substr(7);
    const auto v = plain_file.read<float>(t.name);
    out.add(n, std::span<const float>(v), t.shape);
  }
  const auto path = scratch("renamed.safetensors");
  out.save(path);
  layer<E, 2> loaded{E{4, 2}, {}, 2};
  CHECK_THROWS_WITH_AS(load(path, loaded), doctest::Contains("has no tensor 'experts.down.weight'"), io_error);
  load(path, loaded, "", [](std::string_view name) {
    std::string s(name);
    return s.starts_with("experts.") ? "adapters." + s.substr(8) : "gate." + s.substr(7);
  });
  CHECK(same_bits(bank_values(loaded), bank_values(block)));
  CHECK(same_bits(router_values(loaded), router_values(block)));
}

TEST_CASE("a failed load names the file and the tensor and changes nothing") {
  using E = adapter<float>;
  layer<E, 3> block{E{4, 2}, {}, 1};
  randomise(block, 6);
  const auto before_bank = bank_values(block), before_router = router_values(block);
  const auto path = scratch("wrong.safetensors");

  // the experts are fine, the router weight has the wrong shape: nothing may be loaded
  layer<E, 3> other{E{4, 2}, {}, 9};
  randomise(other, 7);
  safetensors_writer out;
  add(out, other.bank());
  for (const auto& s : other.router().layout()) {
    auto v = other.router().values().subspan(s.offset, s.size());
    std::vector<std::size_t> shape = s.shape;
    if (s.name == "weight") shape = {s.shape[1], s.shape[0]};
    out.add("router." + s.name, std::span<const float>(v), shape);
  }
  out.save(path);
  CHECK_THROWS_WITH_AS(load(path, block), doctest::Contains("wrong.safetensors"), io_error);
  CHECK_THROWS_WITH_AS(load(path, block), doctest::Contains("tensor 'router.weight' has shape [4, 3], the router needs [3, 4]"),
                       io_error);
  CHECK(same_bits(bank_values(block), before_bank));
  CHECK(same_bits(router_values(block), before_router));

  // a missing tensor: the router file lacks the experts
  const auto router_only = scratch("router_only.safetensors");
  save(router_only, other.router());
  CHECK_THROWS_WITH_AS(load(router_only, block),
                       doctest::Contains("has no tensor 'experts.down.weight', which the expert bank needs with shape [3, 4, 2]"),
                       io_error);
  CHECK(same_bits(bank_values(block), before_bank));

  // another expert count
  layer<E, 2> two{E{4, 2}, {}, 1};
  const auto two_path = scratch("two.safetensors");
  save(two_path, two);
  CHECK_THROWS_WITH_AS(load(two_path, block), doctest::Contains("experts is 2 in the file, 3 in the layer"), io_error);
  CHECK_THROWS_WITH_AS(load(two_path, block, "", {}, {.parameters_only = true}),
                       doctest::Contains("has shape [2, 4, 2], the expert bank needs [3, 4, 2]"), io_error);
  CHECK(same_bits(bank_values(block), before_bank));
  CHECK(same_bits(router_values(block), before_router));

  // a non-float dtype
  safetensors_writer ints;
  const std::vector<float> v(4);
  ints.add("x", std::span<const float>(v), {4});
  auto bytes = ints.serialize();
  const std::string text(bytes.begin() + 8, bytes.end() - 16);
  const auto at = text.find("F32");
  bytes[8 + at] = 'I';  // "I32"
  const auto ints_file = safetensors_file::parse(bytes, "ints.safetensors");
  linear<float> lin{2, 2};
  expert_bank<linear<float>, 1> bank{lin};
  (void)ints_file;
  CHECK_THROWS_WITH_AS(load(safetensors_file::parse(bytes, "ints.safetensors"), bank, "",
                            [](std::string_view) { return std::string("x"); }),
                       doctest::Contains("has dtype I32"), io_error);
}

TEST_CASE("checkpoints follow the routing strategy: no router without one, skills and baselines when present") {
  using E = linear<double>;
  const E proto{3, 2};
  auto names = [](const fs::path& p) {
    std::vector<std::string> out;
    const auto file = safetensors_file::open(p);
    for (const auto& t : file.tensors()) out.push_back(t.name);
    return out;
  };

  SUBCASE("tag routing stores the experts only") {
    layer<E, 3> a{proto, {.routing = {.strategy = strategy::tag}}, 1};
    randomise(a, 1);
    const auto path = scratch("tag.safetensors");
    save(path, a);
    CHECK(names(path) == std::vector<std::string>{"experts.weight", "experts.bias"});
    layer<E, 3> b{proto, {.routing = {.strategy = strategy::tag}}, 2};
    load(path, b);
    CHECK(same_bits(bank_values(b), bank_values(a)));
  }

  SUBCASE("latent skills add their logits [tasks, N]") {
    const layer_options opts{.routing = {.strategy = strategy::latent_skills, .tasks = 4}};
    layer<E, 3> a{proto, opts, 1};
    randomise(a, 2);
    for (auto& v : std::span(a.skills().logits().data, 12)) v += 0.5;
    const auto path = scratch("skills.safetensors");
    save(path, a, "m.");
    CHECK(names(path) == std::vector<std::string>{"m.experts.weight", "m.experts.bias", "m.skills.logits"});
    CHECK(safetensors_file::open(path).at("m.skills.logits").shape == std::vector<std::size_t>{4, 3});
    layer<E, 3> b{proto, opts, 2};
    load(path, b, "m.");
    CHECK(same_bits(bank_values(b), bank_values(a)));
    CHECK(same_bits(std::span(b.skills().logits().data, 12), std::span(a.skills().logits().data, 12)));
    // a file without the skills leaves the layer as it was
    const auto before = bank_values(b);
    layer<E, 3> plain{proto, {}, 3};
    randomise(plain, 4);
    const auto plain_path = scratch("plain.safetensors");
    save(plain_path, plain, "m.");
    CHECK_THROWS_WITH_AS(load(plain_path, b, "m."),
                         doctest::Contains("strategy is smear in the file, latent_skills in the layer"), io_error);
    CHECK_THROWS_WITH_AS(load(plain_path, b, "m.", {}, {.parameters_only = true}),
                         doctest::Contains("has no tensor 'm.skills.logits'"), io_error);
    CHECK(same_bits(bank_values(b), before));
  }

  SUBCASE("REINFORCE with a learned baseline adds its parameters") {
    const layer_options opts{.routing = {.strategy = strategy::top_k, .estimator = estimator::reinforce,
                                         .baseline = baseline::learned}};
    layer<E, 3> a{proto, opts, 1};
    randomise(a, 5);
    const auto path = scratch("reinforce.safetensors");
    save(path, a);
    const auto n = names(path);
    CHECK(n.back() == "baseline.parameters");
    CHECK(std::find(n.begin(), n.end(), "router.weight") != n.end());
    layer<E, 3> b{proto, opts, 9};
    CHECK_FALSE(same_bits(b.baseline().values(), a.baseline().values()));
    load(path, b);
    CHECK(same_bits(b.baseline().values(), a.baseline().values()));
    CHECK(same_bits(router_values(b), router_values(a)));
  }

  SUBCASE("cluster routing adds its centres [N, d]") {
    const layer_options opts{.routing = {.strategy = strategy::cluster}};
    layer<E, 3> a{proto, opts, 1};
    randomise(a, 6);
    std::vector<double> x(4 * 3, 0.5), y(4 * 2);
    a.forward(make_tokens<const double>(x.data(), 4, 1, 3), y);  // moves a centre
    const auto path = scratch("cluster.safetensors");
    save(path, a, "c.");
    CHECK(names(path) == std::vector<std::string>{"c.experts.weight", "c.experts.bias", "c.clusters"});
    CHECK(safetensors_file::open(path).at("c.clusters").shape == std::vector<std::size_t>{3, 3});
    layer<E, 3> b{proto, opts, 7};
    const auto centres = [](auto& l) {
      const auto c = l.cluster_centres();
      return std::vector<double>(c.data, c.data + c.rows * c.cols);
    };
    CHECK_FALSE(same_bits(centres(b), centres(a)));
    load(path, b, "c.");
    CHECK(same_bits(centres(b), centres(a)));
  }

  SUBCASE("soft_moe adds Φ [d, N, s] and its scale [N, s], no router; the slots are part of the architecture") {
    const layer_options opts{.routing = {.strategy = strategy::soft_moe, .soft_slots = 2}};
    layer<E, 3> a{proto, opts, 1};
    randomise(a, 7);
    for (auto& v : a.soft_moe().values()) v += 0.25;  // the scale too, away from its start at 1
    const auto path = scratch("soft_moe.safetensors");
    save(path, a, "s.");
    CHECK(names(path) ==
          std::vector<std::string>{"s.experts.weight", "s.experts.bias", "s.soft_moe.weight", "s.soft_moe.scale"});
    const auto file = safetensors_file::open(path);
    CHECK(file.at("s.soft_moe.weight").shape == std::vector<std::size_t>{3, 3, 2});
    CHECK(file.at("s.soft_moe.scale").shape == std::vector<std::size_t>{3, 2});
    layer<E, 3> b{proto, opts, 7};
    CHECK_FALSE(same_bits(b.soft_moe().values(), a.soft_moe().values()));
    load(path, b, "s.");
    CHECK(same_bits(b.soft_moe().values(), a.soft_moe().values()));
    CHECK(same_bits(bank_values(b), bank_values(a)));
    layer<E, 3> one_slot{proto, {.routing = {.strategy = strategy::soft_moe}}, 1};
    CHECK_THROWS_WITH_AS(load(path, one_slot, "s."), doctest::Contains("soft_moe.slots"), io_error);
  }
}

TEST_CASE("a layer's training-step count travels in the metadata; a bad count is refused, changing nothing") {
  using E = adapter<float>;
  layer<E, 3> block{E{4, 2}, {}, 1};
  block.set_training_steps(12345);
  const auto path = scratch("steps.safetensors");
  save(path, block, "blk.");
  CHECK(safetensors_file::open(path).metadata().at("blk.smear.training_steps") == "12345");
  layer<E, 3> fresh{E{4, 2}, {}, 2};
  load(path, fresh, "blk.");
  CHECK(fresh.training_steps() == 12345);

  // an entry that is not a count is refused before anything changes
  safetensors_writer w;
  add(w, block, "other.");
  const auto no_steps = scratch("no-steps.safetensors");
  w.metadata("other.smear.training_steps", "12x");
  w.save(no_steps);
  layer<E, 3> target{E{4, 2}, {}, 3};
  target.set_training_steps(7);
  const auto before = std::vector<float>(target.router().values().begin(), target.router().values().end());
  CHECK_THROWS_WITH_AS(load(safetensors_file::open(no_steps), target, "other."),
                       doctest::Contains("metadata 'other.smear.training_steps' is '12x'"), io_error);
  CHECK(target.training_steps() == 7);
  CHECK(std::equal(before.begin(), before.end(), target.router().values().begin()));
}

TEST_CASE("a layer in checked mode refuses non-finite parameters on load, naming the tensor, changing nothing") {
  using E = adapter<float>;
  layer<E, 3> saved{E{4, 2}, {}, 1};
  saved.router().values()[saved.router().weight_offset() + 5] = std::nanf("");
  const auto path = scratch("nan.safetensors");
  save(path, saved);
  layer<E, 3> checked{E{4, 2}, {.check_finite = true}, 2};
  const std::vector<float> before(checked.router().values().begin(), checked.router().values().end());
  CHECK_THROWS_WITH_AS(load(path, checked), doctest::Contains("tensor 'router.weight' holds nan at flat index 5"),
                       io_error);
  CHECK(std::equal(before.begin(), before.end(), checked.router().values().begin()));
  layer<E, 3> plain{E{4, 2}, {}, 3};
  load(path, plain);  // not in checked mode: loaded as it is
  CHECK(std::isnan(plain.router().values()[plain.router().weight_offset() + 5]));
}

TEST_CASE("saving to a narrower dtype refuses values it cannot hold, or saturates them and says so") {
  using E = linear<float>;
  layer<E, 2> block{E{2, 2}, {.routing = {.strategy = strategy::tag}}, 1};
  auto v = block.bank().values();
  v(0, 1) = 70000.0f;  // beyond F16's 65504
  v(1, 3) = -1e-8f;    // below F16's smallest subnormal (6e-8), not zero
  const auto path = scratch("narrow.safetensors");
  CHECK_THROWS_WITH_AS(save(path, block, "", {.dtype = dtype::f16}),
                       doctest::Contains("value 70000 at flat index 1 does not fit F16 (it would be infinite)"),
                       value_error);
  v(0, 1) = 1.0f;
  CHECK_THROWS_WITH_AS(save(path, block, "", {.dtype = dtype::f16}), doctest::Contains("(it would be zero)"),
                       value_error);
  CHECK_NOTHROW(save(path, block, "", {.dtype = dtype::bf16}));  // BF16 holds both
  v(0, 1) = 70000.0f;
  save(path, block, "", {.dtype = dtype::f16, .narrowing = narrowing::saturate});
  const auto file = safetensors_file::open(path);
  CHECK(file.metadata().at("smear.saturated") == "2");
  const auto w = file.read<float>("experts.weight");  // [2, 2, 2]
  CHECK(w[1] == 65504.0f);
  CHECK(w[4 + 3] == 0.0f);
  // in range: no entry
  v(0, 1) = 1.0f;
  v(1, 3) = 0.5f;
  save(path, block, "", {.dtype = dtype::f16, .narrowing = narrowing::saturate});
  CHECK_FALSE(safetensors_file::open(path).metadata().contains("smear.saturated"));
}

TEST_CASE("checkpoints record the architecture and refuse a layer that differs, naming the difference") {
  using E = adapter<double>;
  const auto path = scratch("architecture.safetensors");
  layer<E, 3> saved{E{4, 2, {.act = activation::silu}}, {}, 1};
  save(path, saved, "blk.");
  const auto file = safetensors_file::open(path);
  CHECK(file.metadata().at("blk.smear.architecture").find("expert=adapter; expert.dim=4; expert.bottleneck=2; "
                                                          "expert.activation=silu") == 0);

  auto refused = [&](auto& other, const char* difference) {
    const auto before = bank_values(other);
    CHECK_THROWS_WITH_AS(load(path, other, "blk."), doctest::Contains(difference), io_error);
    CHECK(same_bits(bank_values(other), before));
  };
  SUBCASE("another activation") {
    layer<E, 3> relu{E{4, 2, {.act = activation::relu}}, {}, 2};
    refused(relu, "expert.activation is silu in the file, relu in the layer");
    load(path, relu, "blk.", {}, {.parameters_only = true});  // asked for: the tensors load
    CHECK(same_bits(bank_values(relu), bank_values(saved)));
  }
  SUBCASE("an up-projection bias the layer lacks") {
    const auto biased_path = scratch("architecture_bias.safetensors");
    layer<E, 3> biased{E{4, 2, {.up_bias = true}}, {}, 3};
    save(biased_path, biased);
    layer<E, 3> plain{E{4, 2}, {}, 4};
    const auto before = bank_values(plain);
    CHECK_THROWS_WITH_AS(load(biased_path, plain), doctest::Contains("expert.up_bias is true in the file, false"),
                         io_error);
    CHECK(same_bits(bank_values(plain), before));
  }
  SUBCASE("another router temperature") {
    layer<E, 3> hot{E{4, 2}, {.router = {.temperature = 0.1}}, 5};
    refused(hot, "router.temperature is 1 in the file, 0.10000000000000001 in the layer");
  }
  SUBCASE("another strategy option") {
    layer<E, 3> topk{E{4, 2}, {.routing = {.strategy = strategy::top_k, .k = 2}}, 6};
    refused(topk, "strategy is smear in the file, top_k in the layer");
  }
  SUBCASE("an expert without describe(): its layout is recorded") {
    using A = archetypes::mergeable_expert<double>;
    const auto a_path = scratch("architecture_archetype.safetensors");
    layer<A, 2> a{A{3}, {}, 7};
    save(a_path, a);
    CHECK(safetensors_file::open(a_path).metadata().at("smear.architecture").find("expert.layout=") !=
          std::string::npos);
    layer<A, 2> b{A{3}, {}, 8};
    load(a_path, b);
  }
  SUBCASE("training-only options may change on resume") {
    layer<E, 3> resumed{E{4, 2}, {.router = {.expert_dropout = 0.1}}, 9};
    load(path, resumed, "blk.");
    CHECK(same_bits(bank_values(resumed), bank_values(saved)));
  }
  SUBCASE("a file without a recorded architecture loads; an unreadable one is refused") {
    safetensors_writer out;
    add(out, saved.bank(), "blk.");
    add(out, saved.router(), "blk.");
    const auto bare = scratch("architecture_none.safetensors");
    out.save(bare);
    layer<E, 3> other{E{4, 2}, {}, 10};
    load(bare, other, "blk.");
    CHECK(same_bits(bank_values(other), bank_values(saved)));
    out.metadata("blk.smear.architecture", "no pairs here");
    out.save(bare);
    CHECK_THROWS_WITH_AS(load(bare, other, "blk."), doctest::Contains("is not a list of key=value pairs"), io_error);
  }
}
