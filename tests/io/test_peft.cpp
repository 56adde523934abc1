// PEFT LoRA adapters as experts: files written by tests/io/peft_files.py (independently of
// smear, following PEFT's format) are loaded into a layer of LoRA experts over the base
// model's module, and its outputs must be PEFT's; the bank saved back must be PEFT's format
// again (checked by the script); broken adapters are refused with their reason, nothing
// changed.

#include <doctest/doctest.h>

#include <smear/io/peft.hpp>
#include <smear/smear.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

using namespace smear;
namespace fs = std::filesystem;

namespace {

const fs::path root = fs::path(SMEAR_IO_TEST_DIR) / "peft";
const std::string module = "encoder.block.0.layer.0.SelfAttention.q";
constexpr std::size_t N = 4;

std::vector<fs::path> adapters() {
  std::vector<fs::path> d;
  for (std::size_t e = 0; e < N; ++e) d.push_back(root / ("adapter_" + std::to_string(e)));
  return d;
}

/// A tag-routed layer (example e runs expert e) of LoRA experts over the base q module.
using peft_layer = layer<lora<double>, N>;
peft_layer make_layer(double alpha_scale = 1.0, bool check_finite = false) {
  const auto base = read_peft_base<double>(root / "base" / "model.safetensors", module);
  auto config = read_peft_config(root / "adapter_0", module);
  config.alpha *= alpha_scale;
  return peft_layer{lora<double>{base.in, base.out, config.rank, base.weight, base.bias, config.options()},
                    {.routing = {.strategy = strategy::tag}, .check_finite = check_finite}};
}

std::vector<double> bank_values(const peft_layer& l) {
  const auto v = l.bank().values();
  return {v.data, v.data + v.rows * v.cols};
}

}  // namespace

TEST_CASE("PEFT adapters written by an independent script compute PEFT's outputs in a smear layer") {
  const auto base = read_peft_base<double>(root / "base" / "model.safetensors", module);
  CHECK(base.in == 6);
  CHECK(base.out == 5);
  CHECK(base.bias.size() == 5);
  const auto config = read_peft_config(root / "adapter_0", module);
  CHECK(config.rank == 4);
  CHECK(config.scaling() == doctest::Approx(2.0));
  CHECK(config.base_model == "t5-small");
  CHECK(read_peft_config(root / "adapter_2", module).rank == 4);      // rank_pattern {"q": 4} over r = 2
  CHECK(read_peft_config(root / "adapter_2", "encoder.block.0.layer.0.SelfAttention.v").rank == 2);
  CHECK(read_peft_config(root / "adapter_3", module).scaling() == doctest::Approx(2.0));  // rsLoRA

  auto block = make_layer();
  const auto dirs = adapters();
  load_peft(block, dirs, module);

  const auto expected = safetensors_file::open(root / "expected.safetensors");
  const auto x = expected.read<double>("x"), want = expected.read<double>("y");
  const auto& shape = expected.at("x").shape;  // [N, L, in]
  std::vector<double> y(want.size());
  const std::vector<std::int32_t> tags{0, 1, 2, 3};
  block.forward(make_tokens(x.data(), shape[0], shape[1], shape[2]), y, {.tags = tags});
  for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == doctest::Approx(want[i]).epsilon(1e-12));

  // and back out as PEFT adapters (tests/io/peft_files.py check reads them)
  std::vector<fs::path> saved;
  for (std::size_t e = 0; e < N; ++e) saved.push_back(root / ("saved_" + std::to_string(e)));
  save_peft(block, saved, module, {.base_model = "t5-small"});
  auto again = make_layer();
  load_peft(again, saved, module);
  CHECK(bank_values(again) == bank_values(block));
  CHECK(read_peft_config(saved[1], module).base_model == "t5-small");
}

TEST_CASE("broken PEFT adapters are refused with their reason and change nothing") {
  auto block = make_layer();
  const auto before = bank_values(block);
  auto refused = [&](const std::string& bad, const std::string& reason) {
    auto dirs = adapters();
    dirs[2] = root / bad;
    CAPTURE(bad);
    CHECK_THROWS_AS(load_peft(block, dirs, module), io_error);
    try {
      load_peft(block, dirs, module);
    } catch (const io_error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(reason) != std::string::npos, std::string(e.what()));
    }
    CHECK(bank_values(block) == before);
  };
  refused("bad_rank", "has rank 3, in 6, out 5; the experts have rank 4");
  refused("bad_target", "target_modules (k, o) do not include module '" + module + "'");
  refused("bad_scale", "scale lora_alpha / r is 1, the experts' is 2");
  refused("bad_dora", "use_dora is true");
  refused("bad_shape", "lora_A is [3, 6] and lora_B [5, 4], expected [r, in] and [out, r] with r = 4");
  refused("bad_module", "it holds LoRAs of: encoder.block.0.layer.0.SelfAttention.v");
  refused("bad_json", "is not valid JSON");
  refused("missing", "cannot open");
  // a NaN loads as it is (IEEE arithmetic propagates it) except into a layer in checked mode
  auto with_nan = adapters();
  with_nan[2] = root / "bad_nan";
  load_peft(block, with_nan, module);
  // lora_B [out 5, r 4] at flat index 5 is B[1][1]: lora_b [r, out] after lora_a [in 6, r 4]
  CHECK(std::isnan(block.bank()[2][6 * 4 + 1 * 5 + 1]));
  auto checked = make_layer(1.0, true);
  const auto checked_before = bank_values(checked);
  CHECK_THROWS_WITH_AS(load_peft(checked, with_nan, module),
                       doctest::Contains("lora_B.weight' holds nan at flat index 5; the layer is in checked mode"),
                       io_error);
  CHECK(bank_values(checked) == checked_before);
  auto three = adapters();
  three.pop_back();
  CHECK_THROWS_WITH_AS(load_peft(block, three, module), "smear::load_peft: 3 adapter directories for 4 experts",
                       io_error);
  auto other_scale = make_layer(0.5);
  CHECK_THROWS_WITH_AS(load_peft(other_scale, adapters(), module),
                       doctest::Contains("build them with lora_options::alpha = 8"), io_error);
  CHECK_THROWS_WITH_AS(read_peft_base<double>(root / "base" / "model.safetensors", "decoder.q"),
                       doctest::Contains("has no tensor 'decoder.q.weight'"), io_error);
}
