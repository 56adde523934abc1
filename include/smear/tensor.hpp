#pragma once
/// \file tensor.hpp
/// Non-owning views over caller memory. smear never copies a caller's tensor into a type
/// of its own: it reads and writes through these views.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

#include "smear/error.hpp"

namespace smear {

/// A row-major matrix view: `rows` rows of `cols` elements, row `i` starting at
/// `data + i * stride`. `T` may be const.
template <class T>
struct matrix_ref {
  T* data = nullptr;
  std::size_t rows = 0;
  std::size_t cols = 0;
  std::size_t stride = 0;

  constexpr matrix_ref() = default;
  constexpr matrix_ref(T* d, std::size_t r, std::size_t c) : data(d), rows(r), cols(c), stride(c) {}
  constexpr matrix_ref(T* d, std::size_t r, std::size_t c, std::size_t s)
      : data(d), rows(r), cols(c), stride(s) {}
  /// A mutable view converts to a const one.
  template <class U>
    requires std::is_same_v<const U, T> && (!std::is_same_v<U, T>)
  constexpr matrix_ref(const matrix_ref<U>& m)  // NOLINT(google-explicit-constructor)
      : data(m.data), rows(m.rows), cols(m.cols), stride(m.stride) {}

  constexpr T& operator()(std::size_t i, std::size_t j) const { return data[i * stride + j]; }
  constexpr std::span<T> row(std::size_t i) const { return {data + i * stride, cols}; }
  /// Rows [first, first + count).
  constexpr matrix_ref middle_rows(std::size_t first, std::size_t count) const {
    return {data + first * stride, count, cols, stride};
  }
  constexpr bool contiguous() const { return stride == cols; }
};

/// A batch of token sequences: `batch` examples padded to `length` tokens of `dim` features,
/// row-major [batch, length, dim]. Example b holds `lengths[b]` valid tokens at the front
/// (right padding); `lengths` empty means every example is full.
template <class T>
struct tokens {
  T* data = nullptr;
  std::size_t batch = 0;
  std::size_t length = 0;
  std::size_t dim = 0;
  std::span<const std::int32_t> lengths{};

  /// Valid tokens of example b.
  constexpr std::size_t valid(std::size_t b) const {
    return lengths.empty() ? length : static_cast<std::size_t>(lengths[b]);
  }
  /// Example b's [length, dim] rows (padding included).
  constexpr matrix_ref<T> example(std::size_t b) const {
    return {data + b * length * dim, length, dim};
  }
  constexpr std::size_t size() const { return batch * length * dim; }
};

/// Makes a token view, e.g. `smear::make_tokens(x.data(), B, L, d, lengths)`.
template <class T>
constexpr tokens<T> make_tokens(T* data, std::size_t batch, std::size_t length, std::size_t dim,
                                std::span<const std::int32_t> lengths = {}) {
  return {data, batch, length, dim, lengths};
}

/// Converts a right-padding mask ([batch, length], nonzero = valid token) to lengths.
/// Throws shape_error when the mask has the wrong size and value_error when a row is
/// not of the form 1…1 0…0 (smear processes the valid tokens of an example as one block).
inline void mask_to_lengths(std::span<const std::uint8_t> mask, std::size_t batch,
                            std::size_t length, std::span<std::int32_t> lengths) {
  constexpr const char* op = "mask_to_lengths";
  if (mask.size() != detail::checked_elements(op, "the mask [batch, length] =", 1, batch, length))
    throw shape_error(detail::message("mask_to_lengths: mask has ", mask.size(),
                                      " elements, expected [batch, length] = ",
                                      detail::shape(batch, length)));
  if (lengths.size() != batch)
    throw shape_error(detail::message("mask_to_lengths: lengths has ", lengths.size(),
                                      " elements, expected batch = ", batch));
  for (std::size_t b = 0; b < batch; ++b) {
    std::size_t n = 0;
    while (n < length && mask[b * length + n] != 0) ++n;
    for (std::size_t t = n; t < length; ++t)
      if (mask[b * length + t] != 0)
        throw value_error(detail::message("mask_to_lengths: example ", b, " has a valid token at ",
                                          t, " after padding at ", n,
                                          "; only right padding is supported"));
    if (n > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()))
      throw value_error(detail::message("mask_to_lengths: example ", b, " has ", n,
                                        " valid tokens, more than a length (int32) can hold"));
    lengths[b] = static_cast<std::int32_t>(n);
  }
}

}  // namespace smear
