#pragma once
/// \file backend/cuda/error.hpp
/// The errors the cuda backend adds to smear's: a failed CUDA or cuBLAS call, and device
/// memory that ran out. Needs no CUDA header.

#include <cstddef>
#include <stdexcept>
#include <string>

namespace smear::device {

/// A CUDA runtime or cuBLAS call failed; the message names the operation and the call's error.
class cuda_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A device allocation failed; the message names the operation, the buffer and the bytes asked
/// for. `bytes()` gives that size.
class out_of_memory : public cuda_error {
 public:
  out_of_memory(const std::string& what, std::size_t bytes) : cuda_error(what), bytes_(bytes) {}
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  std::size_t bytes_;
};

}  // namespace smear::device
