/// \file blocks_adapter.cpp
/// The module's blocks of adapter experts (every compiled N, float32 and float64).
#include "block_impl.hpp"

namespace smear::python {

std::unique_ptr<block> make_adapter_block(const block_spec& s) {
  return with_dtype(s, [&]<class T>() { return make_block(adapter<T>{s.in, s.width, s.adapter}, s); });
}

}  // namespace smear::python
