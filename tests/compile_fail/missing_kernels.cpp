// Must NOT compile: a backend tag that neither derives from smear::backend::reference nor
// overloads the host kernels cannot run a layer. The test checks that the compiler's message
// is smear's sentence naming the first missing kernel. With SMEAR_CONTROL defined the tag
// derives from reference and the same file must compile.
#include <smear/experts/adapter.hpp>
#include <smear/layer.hpp>

#ifdef SMEAR_CONTROL
struct my_backend : smear::backend::reference {};
#else
struct my_backend {};
#endif

int main() {
  smear::layer<smear::adapter<float>, 2, my_backend> block{smear::adapter<float>{4, 2}};
  return static_cast<int>(block.input_dim()) - 4;
}
