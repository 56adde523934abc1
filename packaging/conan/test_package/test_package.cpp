#include <smear/smear.hpp>
#ifdef SMEAR_TEST_IO
#include <smear/io/safetensors.hpp>
#endif

#include <cstdio>
#include <vector>

int main() {
  using expert = smear::adapter<float>;
  smear::layer<expert, 2> block{expert{4, 2}, {}, 1};
  std::vector<float> x(2 * 3 * 4, 0.5f), y(x.size());
  block.forward(smear::make_tokens<const float>(x.data(), 2, 3, 4), y);
#ifdef SMEAR_TEST_IO
  smear::safetensors_writer out;
  out.add("y", std::span<const float>(y), {2, 3, 4});
  const auto file = smear::safetensors_file::parse(out.serialize());
  if (file.read<float>("y") != y) return 1;
#endif
  std::printf("smear %d.%d.%d: y[0] = %.4f\n", smear::version.major, smear::version.minor, smear::version.patch,
              static_cast<double>(y[0]));
  return 0;
}
