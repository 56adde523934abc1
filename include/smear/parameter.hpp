#pragma once
/// \file parameter.hpp
/// A trainable tensor as optimisers see it: its values, its gradient and whether weight
/// decay applies to it. Layers hand out lists of these; optimisers step over them.

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "smear/error.hpp"

namespace smear {

/// Values and gradient of one trainable tensor (spans into the owner's storage, which must
/// outlive the optimiser using them).
template <class T>
struct parameter {
  std::string name;
  std::span<T> value;
  std::span<T> grad;
  bool decay = true;  ///< false for biases and normalisation gains, as usual
  bool on_device = false;  ///< value and grad are in a GPU context's memory (the cuda layer's
                           ///< bank and router): only smear::device optimisers step them
  /// The tensor's shape, row-major, its product value.size() ("experts": [N, P]; a router's
  /// weight: [K, d]; a learned baseline's packed parameters: [count]).
  std::vector<std::size_t> shape{};
};

namespace detail {

/// Throws value_error when a host optimiser is given a parameter in device memory.
template <class T>
void require_host(const parameter<T>& p, const char* optimiser) {
  if (p.on_device)
    throw value_error(message(optimiser, ": parameter '", p.name, "' is in device memory; step the cuda layer's ",
                              "parameters with smear::device::", optimiser, " (smear/cuda/optimizers.hpp)"));
}

}  // namespace detail

template <class T>
using parameter_list = std::vector<parameter<T>>;

}  // namespace smear
