/// \file blocks_lora.cpp
/// The module's blocks of LoRA experts (every compiled N, float32 and float64).
#include "block_impl.hpp"

namespace smear::python {
namespace {

/// The values of the optional array `o` (any real dtype, converted to T), which must have
/// `count` of them; empty for None.
template <class T>
std::vector<T> values_of(const py::object& o, std::size_t count, const char* what) {
  if (o.is_none()) return {};
  auto a = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(o);
  if (!a) throw value_error(detail::message("lora: ", what, " is not an array of numbers"));
  if (static_cast<std::size_t>(a.size()) != count)
    throw shape_error(detail::message("lora: ", what, " has ", a.size(), " values, expected ", count));
  return {a.data(), a.data() + count};
}

}  // namespace

std::unique_ptr<block> make_lora_block(const block_spec& s) {
  return with_dtype(s, [&]<class T>() {
    return make_block(lora<T>{s.in, s.out, s.width, values_of<T>(s.frozen_weight, s.in * s.out, "frozen_weight [in, out]"),
                              values_of<T>(s.frozen_bias, s.out, "frozen_bias [out]"), s.lora},
                      s);
  });
}

}  // namespace smear::python
