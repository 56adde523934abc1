/// \file blocks_linear.cpp
/// The module's blocks of linear experts (every compiled N, float32 and float64).
#include "block_impl.hpp"

namespace smear::python {

std::unique_ptr<block> make_linear_block(const block_spec& s) {
  return with_dtype(s, [&]<class T>() { return make_block(linear<T>{s.in, s.out, s.linear}, s); });
}

}  // namespace smear::python
