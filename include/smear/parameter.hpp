#pragma once
/// \file parameter.hpp
/// A trainable tensor as optimisers see it: its values, its gradient and whether weight
/// decay applies to it. Layers hand out lists of these; optimisers step over them.

#include <span>
#include <string>
#include <vector>

namespace smear {

/// Values and gradient of one trainable tensor (spans into the owner's storage, which must
/// outlive the optimiser using them).
template <class T>
struct parameter {
  std::string name;
  std::span<T> value;
  std::span<T> grad;
  bool decay = true;  ///< false for biases and normalisation gains, as usual
};

template <class T>
using parameter_list = std::vector<parameter<T>>;

}  // namespace smear
