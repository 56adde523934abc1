// Writes tiny T5 encoder checkpoints (ReLU and gated-GELU), a batch of token ids and the
// encoder's output for them, for check_t5_numpy.py to recompute independently.
//
// Usage: t5_fixture DIR

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "../t5.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: t5_fixture DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  for (const bool gated : {false, true}) {
    t5ex::t5_config c{.vocab_size = 23, .d_model = 8, .d_kv = 3, .num_heads = 2, .d_ff = 12, .num_layers = 2,
                      .relative_attention_num_buckets = 8, .relative_attention_max_distance = 12,
                      .gated_gelu = gated};
    t5ex::t5_encoder enc{c};
    enc.initialize(gated ? 11 : 7);
    // move the norms away from 1 so that their gains are exercised
    smear::rng gen{3};
    for (const auto& s : enc.slots())
      if (s.name.find("layer_norm") != std::string::npos)
        for (auto& v : enc.tensor(s.name)) v = static_cast<float>(0.5 + gen.uniform());
    const std::string name = gated ? "gated" : "relu";
    enc.save(dir + "/" + name + ".safetensors", {{"format", "pt"}});
    // B = 3 examples padded to L = 20 (longer than max_distance / 2, so log buckets are used)
    const std::size_t B = 3, L = 20;
    std::vector<std::int32_t> ids(B * L, 0), lengths{20, 7, 1};
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t t = 0; t < static_cast<std::size_t>(lengths[b]); ++t)
        ids[b * L + t] = static_cast<std::int32_t>(gen.below(c.vocab_size));
    std::vector<float> out(B * L * c.d_model);
    // reload from the file, to test the reader too
    t5ex::t5_encoder loaded{c};
    loaded.load(dir + "/" + name + ".safetensors");
    loaded.forward(ids, B, L, lengths, out);
    std::ofstream f(dir + "/" + name + ".json");
    nlohmann::json j;
    j["config"] = {{"vocab_size", c.vocab_size}, {"d_model", c.d_model}, {"d_kv", c.d_kv},
                   {"num_heads", c.num_heads}, {"d_ff", c.d_ff}, {"num_layers", c.num_layers},
                   {"num_buckets", c.relative_attention_num_buckets},
                   {"max_distance", c.relative_attention_max_distance}, {"gated_gelu", gated},
                   {"eps", c.layer_norm_epsilon}};
    j["B"] = B;
    j["L"] = L;
    j["ids"] = ids;
    j["lengths"] = lengths;
    j["output"] = out;
    f << j.dump();
    std::printf("wrote %s/%s.{safetensors,json}\n", dir.c_str(), name.c_str());
  }
}
