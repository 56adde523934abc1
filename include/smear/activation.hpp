#pragma once
/// \file activation.hpp
/// The element-wise nonlinearities experts use, with their derivatives.

#include <cmath>
#include <string_view>

namespace smear {

/// `silu` (swish, x·σ(x)) is the official SMEAR adapter's default; `gelu` is the tanh
/// approximation (T5's "gelu_new"); `identity` makes an adapter linear.
enum class activation { silu, relu, gelu, identity };

constexpr std::string_view to_string(activation a) noexcept {
  switch (a) {
    case activation::silu: return "silu";
    case activation::relu: return "relu";
    case activation::gelu: return "gelu";
    case activation::identity: return "identity";
  }
  return "?";
}

namespace detail {
inline constexpr double gelu_k0 = 0.7978845608028654;  // sqrt(2 / pi)
inline constexpr double gelu_k1 = 0.044715;

/// act(x)
template <class T>
T activate(activation a, T x) noexcept {
  switch (a) {
    case activation::silu: return x / (T(1) + std::exp(-x));
    case activation::relu: return x > T(0) ? x : T(0);
    case activation::gelu: {
      const T u = T(gelu_k0) * (x + T(gelu_k1) * x * x * x);
      return T(0.5) * x * (T(1) + std::tanh(u));
    }
    case activation::identity: return x;
  }
  return x;
}

/// act'(x)
template <class T>
T activate_derivative(activation a, T x) noexcept {
  switch (a) {
    case activation::silu: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case activation::relu: return x > T(0) ? T(1) : T(0);
    case activation::gelu: {
      const T u = T(gelu_k0) * (x + T(gelu_k1) * x * x * x);
      const T t = std::tanh(u);
      const T du = T(gelu_k0) * (T(1) + T(3 * gelu_k1) * x * x);
      return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
    }
    case activation::identity: return T(1);
  }
  return T(1);
}
}  // namespace detail
}  // namespace smear
