// Must NOT compile: an expert without layout() is not mergeable. With SMEAR_CONTROL defined
// it has one and compiles.
#include <smear/experts/linear.hpp>
#include <smear/layer.hpp>

struct no_layout : smear::linear<float> {
  using smear::linear<float>::linear;
#ifndef SMEAR_CONTROL
  void layout() const = delete;
#endif
};

int main() {
  smear::layer<no_layout, 2> block{no_layout{3, 3}};
  return static_cast<int>(block.input_dim()) - 3;
}
