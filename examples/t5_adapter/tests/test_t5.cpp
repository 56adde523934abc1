// The T5 encoder's backward against central finite differences (with SMEAR routing blocks in
// the hooks), the safetensors reader's checks, and the encoder's input checks.

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "../t5.hpp"

namespace {

class block_hook : public t5ex::sublayer_hook {
 public:
  explicit block_hook(std::size_t d, std::uint64_t seed)
      : layer_{smear::adapter<float>{d, 3, {.init_std = 0.3}}, {}, seed} {}
  void forward(smear::tokens<const float> x, std::span<float> y) override { layer_.forward(x, y); }
  void backward(std::span<const float> dy, std::span<float> dx) override { layer_.backward(dy, dx); }
  smear::layer<smear::adapter<float>, 2>& layer() { return layer_; }

 private:
  smear::layer<smear::adapter<float>, 2> layer_;
};

struct setup {
  t5ex::t5_encoder enc;
  std::vector<std::unique_ptr<block_hook>> hooks;
  std::vector<std::int32_t> ids, lengths{6, 3, 5};
  std::vector<float> weights;  // loss = Σ out ⊙ weights
  std::size_t B = 3, L = 6;

  explicit setup(bool gated)
      : enc{t5ex::t5_config{.vocab_size = 11, .d_model = 6, .d_kv = 2, .num_heads = 2, .d_ff = 7,
                            .num_layers = 2, .relative_attention_num_buckets = 6,
                            .relative_attention_max_distance = 8, .gated_gelu = gated}} {
    enc.initialize(5);
    smear::rng gen{9};
    for (std::size_t i = 0; i < 4; ++i) {
      hooks.push_back(std::make_unique<block_hook>(6, 100 + i));
      enc.set_hook(i, hooks.back().get());
    }
    ids.assign(B * L, 0);
    for (auto& id : ids) id = static_cast<std::int32_t>(gen.below(11));
    weights.resize(B * L * 6);
    for (auto& w : weights) w = static_cast<float>(gen.normal());
  }
  double loss() {
    std::vector<float> out(B * L * 6);
    enc.forward(ids, B, L, lengths, out);
    double s = 0;
    for (std::size_t i = 0; i < out.size(); ++i) s += double(out[i]) * weights[i];
    return s;
  }
};

/// Checks every `stride`-th value of `values` against central differences of the loss.
void check(setup& s, std::span<float> values, std::span<const float> grads, const std::string& what,
           std::size_t stride, float eps, int& checked, int& skipped) {
  for (std::size_t i = 0; i < values.size(); i += stride) {
    const float keep = values[i];
    auto central = [&](float h) {
      values[i] = keep + h;
      const double up = s.loss();
      values[i] = keep - h;
      const double down = s.loss();
      values[i] = keep;
      return (up - down) / (2.0 * double(h));
    };
    const double wide = central(eps), narrow = central(eps / 2);
    if (std::abs(wide - narrow) > 0.1 * std::max(1.0, std::abs(narrow))) {
      // not smooth at this scale (a ReLU kink within ±eps): a difference quotient says nothing
      ++skipped;
      continue;
    }
    // Richardson extrapolation cancels the O(h²) term of the central difference
    const double numeric = (4.0 * narrow - wide) / 3.0;
    const double analytic = grads[i];
    INFO(what << "[" << i << "]: analytic " << analytic << ", numeric " << numeric);
    CHECK(std::abs(analytic - numeric) <= 2e-2 * std::max(1.0, std::abs(numeric)));
    ++checked;
  }
}

void gradient_test(bool gated) {
  setup s{gated};
  s.enc.zero_grad();
  for (auto& h : s.hooks) h->layer().zero_grad();
  std::vector<float> out(s.B * s.L * 6);
  s.enc.forward(s.ids, s.B, s.L, s.lengths, out);
  s.enc.backward(s.weights, true);
  const std::vector<float> grads(s.enc.gradients().begin(), s.enc.gradients().end());
  std::vector<std::vector<float>> hook_grads;
  for (auto& h : s.hooks) {
    auto g = h->layer().bank().gradients();
    hook_grads.emplace_back(g.data, g.data + g.rows * g.cols);
  }
  // ReLU has kinks: a smaller step keeps the central difference on one side of them
  const float eps = gated ? 1e-2f : 2e-4f;
  int checked = 0, skipped = 0;
  for (const auto& slot : s.enc.slots())
    check(s, s.enc.tensor(slot.name), std::span<const float>(grads).subspan(slot.offset, slot.size()), slot.name,
          slot.name == "shared.weight" ? 5 : 3, eps, checked, skipped);
  for (std::size_t k = 0; k < s.hooks.size(); ++k) {
    auto v = s.hooks[k]->layer().bank().values();
    check(s, {v.data, v.rows * v.cols}, hook_grads[k], "hook " + std::to_string(k) + " experts", 7, eps, checked, skipped);
  }
  MESSAGE(checked << " gradients checked against finite differences, " << skipped
                  << " skipped where the loss is not smooth within the step");
  CHECK(skipped * 50 <= checked);
}

}  // namespace

TEST_CASE("t5 encoder backward matches finite differences (gated-GELU, SMEAR blocks in the hooks)") {
  gradient_test(true);
}

TEST_CASE("t5 encoder backward matches finite differences (ReLU, SMEAR blocks in the hooks)") {
  gradient_test(false);
}

TEST_CASE("frozen backward gives the hooks the same gradients as a full backward") {
  setup s{true};
  std::vector<float> out(s.B * s.L * 6);
  std::vector<std::vector<float>> full;
  for (const bool params : {true, false}) {
    for (auto& h : s.hooks) h->layer().zero_grad();
    s.enc.zero_grad();
    s.enc.forward(s.ids, s.B, s.L, s.lengths, out);
    s.enc.backward(s.weights, params);
    for (std::size_t k = 0; k < s.hooks.size(); ++k) {
      auto g = s.hooks[k]->layer().bank().gradients();
      std::vector<float> v(g.data, g.data + g.rows * g.cols);
      if (params) full.push_back(v);
      else CHECK(v == full[k]);
    }
    if (!params)
      for (float g : s.enc.gradients()) CHECK(g == 0.0f);
  }
}

TEST_CASE("t5 encoder checks its inputs") {
  setup s{false};
  std::vector<float> out(s.B * s.L * 6);
  s.ids[2] = 11;
  CHECK_THROWS_AS(s.enc.forward(s.ids, s.B, s.L, s.lengths, out), smear::value_error);
  s.ids[2] = 0;
  CHECK_THROWS_AS(s.enc.forward(s.ids, s.B, s.L + 1, s.lengths, out), smear::shape_error);
  CHECK_THROWS_AS(s.enc.backward(s.weights, true), smear::state_error);
  std::vector<std::int32_t> bad{6, 0, 5};
  CHECK_THROWS_AS(s.enc.forward(s.ids, s.B, s.L, bad, out), smear::value_error);
}

TEST_CASE("safetensors: round trip and rejected files") {
  const auto dir = std::filesystem::temp_directory_path() / "smear_t5_safetensors_test";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "enc.safetensors").string();
  setup s{true};
  s.enc.save(path);
  t5ex::t5_encoder other{s.enc.config()};
  other.load(path);
  CHECK(std::vector<float>(other.values().begin(), other.values().end()) ==
        std::vector<float>(s.enc.values().begin(), s.enc.values().end()));
  // a configuration with another shape is refused, naming the tensor
  t5ex::t5_config wider = s.enc.config();
  wider.d_ff = 8;
  t5ex::t5_encoder mismatch{wider};
  CHECK_THROWS_WITH_AS(mismatch.load(path), doctest::Contains("DenseReluDense.wi_0.weight"), smear::io_error);
  // truncated file
  {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(dir / "cut.safetensors", std::ios::binary).write(bytes.data(), static_cast<long>(bytes.size() / 2));
    std::string huge = bytes;
    huge[7] = '\x7f';  // header length beyond the file
    std::ofstream(dir / "huge.safetensors", std::ios::binary).write(huge.data(), static_cast<long>(huge.size()));
  }
  CHECK_THROWS_AS(smear::safetensors_file::open((dir / "cut.safetensors").string()), smear::io_error);
  CHECK_THROWS_AS(smear::safetensors_file::open((dir / "huge.safetensors").string()), smear::io_error);
  CHECK_THROWS_AS(smear::safetensors_file::open((dir / "absent.safetensors").string()), smear::io_error);
  std::filesystem::remove_all(dir);
}

TEST_CASE("relative position buckets follow T5's formula") {
  // values from Hugging Face's _relative_position_bucket(bidirectional, 32 buckets, 128)
  CHECK(t5ex::relative_position_bucket(0, 32, 128) == 0);
  CHECK(t5ex::relative_position_bucket(-3, 32, 128) == 3);
  CHECK(t5ex::relative_position_bucket(3, 32, 128) == 19);
  CHECK(t5ex::relative_position_bucket(-8, 32, 128) == 8);
  CHECK(t5ex::relative_position_bucket(-200, 32, 128) == 15);
  CHECK(t5ex::relative_position_bucket(200, 32, 128) == 31);
}
