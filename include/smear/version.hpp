#pragma once
/// \file version.hpp
/// The library's version, also available to the preprocessor.

#define SMEAR_VERSION_MAJOR 0
#define SMEAR_VERSION_MINOR 1
#define SMEAR_VERSION_PATCH 0

namespace smear {
/// {major, minor, patch} of the headers in use.
struct version_info {
  int major, minor, patch;
};
inline constexpr version_info version{SMEAR_VERSION_MAJOR, SMEAR_VERSION_MINOR,
                                      SMEAR_VERSION_PATCH};
}  // namespace smear
