// Cross-checks with an independent implementation of the format (safetensors_interop.py,
// Python's json and struct):
//   safetensors_interop write <file>   writes the reference tensors with smear
//   safetensors_interop check <file>   reads a file the Python side wrote, exits 1 on a mismatch
// Reference tensors: "f32" F32 [2, 3], "f64" F64 [3], "f16" F16 [4], "bf16" BF16 [2, 2],
// element i of each = (i - 2) * 0.375 (exact in every dtype).

#include <smear/io/safetensors.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace {

std::vector<double> expected(std::size_t n) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = (static_cast<double>(i) - 2.0) * 0.375;
  return v;
}

struct reference {
  const char* name;
  smear::dtype type;
  std::vector<std::size_t> shape;
  std::size_t size;
};

const reference tensors[] = {{"f32", smear::dtype::f32, {2, 3}, 6},
                             {"f64", smear::dtype::f64, {3}, 3},
                             {"f16", smear::dtype::f16, {4}, 4},
                             {"bf16", smear::dtype::bf16, {2, 2}, 4}};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[1]) != "write" && std::string(argv[1]) != "check")) {
    std::fprintf(stderr, "usage: %s write|check <file.safetensors>\n", argv[0]);
    return 2;
  }
  try {
    if (std::string(argv[1]) == "write") {
      smear::safetensors_writer out;
      out.metadata("format", "pt");
      for (const auto& t : tensors) {
        const auto v = expected(t.size);
        out.add(t.name, std::span<const double>(v), t.shape, t.type);
      }
      out.save(argv[2]);
      std::printf("wrote %s\n", argv[2]);
      return 0;
    }
    const auto file = smear::safetensors_file::open(argv[2]);
    int bad = 0;
    for (const auto& t : tensors) {
      const auto& info = file.at(t.name);
      if (info.type != t.type || info.shape != t.shape) {
        std::fprintf(stderr, "%s: wrong dtype or shape\n", t.name);
        ++bad;
        continue;
      }
      const auto got = file.read<double>(t.name);
      const auto want = expected(t.size);
      for (std::size_t i = 0; i < want.size(); ++i)
        if (got[i] != want[i]) {
          std::fprintf(stderr, "%s[%zu] = %g, expected %g\n", t.name, i, got[i], want[i]);
          ++bad;
        }
    }
    if (file.metadata().count("format") == 0 || file.metadata().at("format") != "pt") {
      std::fprintf(stderr, "__metadata__ lacks format = pt\n");
      ++bad;
    }
    std::printf("%s: %s\n", argv[2], bad ? "MISMATCH" : "all tensors as expected");
    return bad ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
