#pragma once
/// \file error.hpp
/// The exceptions smear throws. Every run-time check happens once, at the public entry
/// point, before any work is done, so a thrown error leaves every object as it was.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace smear {

/// A tensor of the wrong shape or size: the message names the operation and both shapes.
class shape_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// An option or argument with a value outside its domain (a non-positive temperature,
/// a dropout probability outside [0, 1), an empty batch, ...).
class value_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A NaN or an infinity found by a layer in checked mode; the message names the tensor
/// and the first offending index.
class numeric_error : public std::domain_error {
 public:
  using std::domain_error::domain_error;
};

/// Calls made in the wrong order (backward before forward, twice for one forward, ...).
class state_error : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

/// A checkpoint file that cannot be read or written; the message names the file and,
/// where one is involved, the tensor.
class io_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Joins its arguments with operator<< into one message.
template <class... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

/// "[a, b, c]"
template <class... Dims>
std::string shape(Dims... dims) {
  std::ostringstream out;
  out << '[';
  const char* sep = "";
  ((out << sep << dims, sep = ", "), ...);
  out << ']';
  return out.str();
}

/// a·b, or nothing on overflow.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

/// The element count of a tensor of shape `dims` (named `what` in the message of `op`),
/// throwing shape_error when it, or its size in bytes of `element_bytes` each, does not fit
/// in std::size_t.
template <class... Dims>
std::size_t checked_elements(const char* op, const char* what, std::size_t element_bytes, Dims... dims) {
  std::optional<std::uint64_t> n = 1;
  ((n = n ? checked_mul(*n, static_cast<std::uint64_t>(dims)) : n), ...);
  if (n) n = checked_mul(*n, element_bytes);
  if (!n || *n > std::numeric_limits<std::size_t>::max())
    throw shape_error(message(op, ": ", what, " ", shape(dims...), " has more elements than memory can address"));
  return static_cast<std::size_t>(*n / element_bytes);
}

}  // namespace detail
}  // namespace smear
