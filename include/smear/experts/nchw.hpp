#pragma once
/// \file experts/nchw.hpp
/// Layout helpers for convolutional feature maps: smear's layers read an example's tokens as
/// rows of features, so an NCHW map [B, C, H, W] becomes tokens [B, H·W, C] (NHWC) and back.

#include <cstddef>
#include <span>

#include "smear/error.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// The shape of a batch of feature maps.
struct map_shape {
  std::size_t batch = 0;
  std::size_t channels = 0;
  std::size_t height = 0;
  std::size_t width = 0;

  constexpr std::size_t positions() const { return height * width; }
  constexpr std::size_t size() const { return batch * channels * height * width; }
};

namespace detail {
inline void check_map(const char* op, const char* name, std::size_t got, map_shape s) {
  if (got != s.size())
    throw shape_error(message(op, ": ", name, " has ", got, " values, expected [B, C, H, W] = ",
                              shape(s.batch, s.channels, s.height, s.width), " = ", s.size()));
}
}  // namespace detail

/// dst[b, h·W + w, c] = src[b, c, h, w]. Throws shape_error when a span's size is not s.size().
template <class In, class Out>
void nchw_to_nhwc(std::span<In> src, std::span<Out> dst, map_shape s) {
  detail::check_map("nchw_to_nhwc", "src", src.size(), s);
  detail::check_map("nchw_to_nhwc", "dst", dst.size(), s);
  const std::size_t hw = s.positions(), c = s.channels;
  for (std::size_t b = 0; b < s.batch; ++b)
    for (std::size_t ch = 0; ch < c; ++ch)
      for (std::size_t p = 0; p < hw; ++p)
        dst[(b * hw + p) * c + ch] = static_cast<Out>(src[(b * c + ch) * hw + p]);
}

/// dst[b, c, h, w] = src[b, h·W + w, c], the inverse of nchw_to_nhwc.
template <class In, class Out>
void nhwc_to_nchw(std::span<In> src, std::span<Out> dst, map_shape s) {
  detail::check_map("nhwc_to_nchw", "src", src.size(), s);
  detail::check_map("nhwc_to_nchw", "dst", dst.size(), s);
  const std::size_t hw = s.positions(), c = s.channels;
  for (std::size_t b = 0; b < s.batch; ++b)
    for (std::size_t ch = 0; ch < c; ++ch)
      for (std::size_t p = 0; p < hw; ++p)
        dst[(b * c + ch) * hw + p] = static_cast<Out>(src[(b * hw + p) * c + ch]);
}

/// The token view of an NHWC batch of maps: `s.batch` examples of H·W tokens of C features,
/// ready for smear::layer::forward (every position valid).
template <class T>
constexpr tokens<T> map_tokens(T* nhwc, map_shape s) {
  return {nhwc, s.batch, s.positions(), s.channels, {}};
}

}  // namespace smear
