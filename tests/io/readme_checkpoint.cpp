#include <smear/io/checkpoint.hpp>
#include <smear/smear.hpp>

#include <cstdio>

int main() {
  using expert = smear::adapter<float>;
  smear::layer<expert, 8> block{expert{64, 16}, {}, /*seed=*/42};
  // ... train ...
  smear::save("block.safetensors", block, "block.0.");              // F32, written atomically
  smear::save("block.bf16.safetensors", block, "block.0.", {.dtype = smear::dtype::bf16});

  smear::layer<expert, 8> restored{expert{64, 16}};
  smear::load("block.safetensors", restored, "block.0.");           // all or nothing

  auto file = smear::safetensors_file::open("block.bf16.safetensors"); // any safetensors file
  for (const auto& t : file.tensors())
    std::printf("%s %s [%zu, ...]\n", t.name.c_str(), smear::to_string(t.type).data(), t.shape[0]);
  smear::load(file, restored, "block.0.");                          // BF16 converted to float
}
