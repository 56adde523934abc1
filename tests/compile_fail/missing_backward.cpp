// Must NOT compile: an expert without backward() cannot make a SMEAR layer. The test checks
// that the compiler's message is smear's sentence naming the missing member. With
// SMEAR_CONTROL defined the same file must compile (so the failure has no other cause).
#include <smear/layer.hpp>

struct my_expert {
  using value_type = float;
  std::size_t input_dim() const { return 4; }
  std::size_t output_dim() const { return 4; }
  std::size_t parameter_count() const { return 4; }
  std::size_t saved_size(std::size_t) const { return 0; }
  std::size_t scratch_size(std::size_t) const { return 0; }
  void forward(smear::backend::reference, std::span<const float>, smear::matrix_ref<const float>,
               smear::matrix_ref<float>, std::span<float>) const {}
#ifdef SMEAR_CONTROL
  void backward(smear::backend::reference, std::span<const float>, smear::matrix_ref<const float>,
                std::span<const float>, smear::matrix_ref<const float>, smear::matrix_ref<float>,
                std::span<float>, std::span<float>) const {}
#endif
  smear::parameter_layout layout() const {
    return smear::layout_builder{}.add("w", {4}, smear::init_rule::zeros()).build();
  }
};

int main() {
  smear::layer<my_expert, 2> block{my_expert{}};
  return static_cast<int>(block.input_dim()) - 4;
}
