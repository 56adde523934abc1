// The README's usage example, compiled and run by the tests so it stays true.
#include <smear/smear.hpp>

#include <cstdio>
#include <vector>

int main() {
  constexpr std::size_t B = 4, L = 16, d = 64;
  using expert = smear::adapter<float>;  // d -> m -> d, SiLU, residual added by the block
  smear::layer<expert, 8> block{expert{d, 16}, {.router = {.expert_dropout = 0.1}}, /*seed=*/42};

  std::vector<float> x(B * L * d, 0.5f), y(x.size()), dy(x.size()), dx(x.size());
  std::vector<std::int32_t> lengths{16, 9, 12, 3};  // valid tokens per example (right padding)
  auto tokens = smear::make_tokens<const float>(x.data(), B, L, d, lengths);

  smear::adamw<float> opt{block.parameters(), {.lr = 3e-4, .weight_decay = 0.01}};
  for (int step = 0; step < 3; ++step) {
    block.forward(tokens, y);          // routes, merges 8 experts per example, applies
    for (std::size_t i = 0; i < y.size(); ++i) dy[i] = y[i] - 1.0f;  // ∂ℓ/∂y of some loss
    opt.zero_grad();
    block.backward(dy, dx);            // ∂ℓ/∂x, and gradients of experts and router
    opt.step();
  }
  auto p = block.routing();            // [B, 8] routing probabilities of the last forward
  for (std::size_t e = 0; e < 8; ++e) std::printf("%.3f ", double(p(0, e)));
  std::printf("\n");
}
