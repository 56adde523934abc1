// A user's program: one SMEAR layer forward and backward, and (with smear::io) a checkpoint
// saved and loaded back. Exits 1 when something is off.
#include <smear/smear.hpp>
#ifdef SMEAR_CONSUMER_IO
#include <smear/io/checkpoint.hpp>
#endif

#include <cmath>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  constexpr std::size_t B = 2, L = 3, d = 8;
  using expert = smear::adapter<float>;
  smear::layer<expert, 4> block{expert{d, 2}, {}, 1};
  std::vector<float> x(B * L * d, 0.25f), y(x.size()), dy(x.size(), 1.0f), dx(x.size());
  block.forward(smear::make_tokens<const float>(x.data(), B, L, d), y);
  block.backward(dy, dx);
  for (float v : y)
    if (!std::isfinite(v)) return 1;
#ifdef SMEAR_CONSUMER_IO
  if (argc < 2) return 1;
  smear::save(argv[1], block, "block.0.");
  smear::layer<expert, 4> copy{expert{d, 2}, {}, 2};
  smear::load(argv[1], copy, "block.0.");
  auto a = block.bank().values(), b = copy.bank().values();
  for (std::size_t e = 0; e < a.rows; ++e)
    for (std::size_t j = 0; j < a.cols; ++j)
      if (a(e, j) != b(e, j)) return 1;
  std::printf("checkpoint %s: saved and loaded\n", argv[1]);
#else
  (void)argc;
  (void)argv;
#endif
  std::printf("smear %d.%d.%d: y[0] = %.4f, routing[0] = %.3f\n", smear::version.major, smear::version.minor,
              smear::version.patch, static_cast<double>(y[0]), static_cast<double>(block.routing()(0, 0)));
  return 0;
}
