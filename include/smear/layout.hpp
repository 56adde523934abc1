#pragma once
/// \file layout.hpp
/// Where each named tensor of an expert sits inside its flat parameter vector, and how it is
/// initialised. Checkpoints, initialisation and analysis all read an expert through this.

#include <cstddef>
#include <functional>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "smear/error.hpp"
#include "smear/random.hpp"

namespace smear {

/// How a fresh tensor is filled: zeros, ones, N(0, scale²) or U(-scale, scale).
struct init_rule {
  enum class kind { zeros, ones, normal, uniform, constant };
  kind what = kind::zeros;
  double scale = 0.0;

  static constexpr init_rule zeros() { return {kind::zeros, 0.0}; }
  static constexpr init_rule ones() { return {kind::ones, 0.0}; }
  static constexpr init_rule normal(double stddev) { return {kind::normal, stddev}; }
  static constexpr init_rule uniform(double bound) { return {kind::uniform, bound}; }
  static constexpr init_rule constant(double value) { return {kind::constant, value}; }
};

/// One named tensor inside a flat parameter vector: elements [offset, offset + size()),
/// row-major with the given shape.
struct parameter_slot {
  std::string name;
  std::size_t offset = 0;
  std::vector<std::size_t> shape;
  init_rule init;

  std::size_t size() const {
    return std::accumulate(shape.begin(), shape.end(), std::size_t{1}, std::multiplies<>{});
  }
};

/// The tensors of one expert, in order; they tile [0, P) without gaps.
using parameter_layout = std::vector<parameter_slot>;

/// Builds a layout by appending tensors one after the other.
class layout_builder {
 public:
  layout_builder& add(std::string name, std::vector<std::size_t> shape, init_rule init) {
    parameter_slot s{std::move(name), next_, std::move(shape), init};
    next_ += s.size();
    slots_.push_back(std::move(s));
    return *this;
  }
  parameter_layout build() { return std::move(slots_); }

 private:
  parameter_layout slots_;
  std::size_t next_ = 0;
};

/// Total number of elements the layout covers.
inline std::size_t layout_size(const parameter_layout& layout) {
  std::size_t n = 0;
  for (const auto& s : layout) n += s.size();
  return n;
}

/// The slot called `name`; throws value_error naming the known slots when there is none.
inline const parameter_slot& find_slot(const parameter_layout& layout, std::string_view name) {
  for (const auto& s : layout)
    if (s.name == name) return s;
  std::string known;
  for (const auto& s : layout) known += (known.empty() ? "" : ", ") + s.name;
  throw value_error(detail::message("no parameter called '", name, "'; the layout has: ", known));
}

/// Fills `params` following each slot's rule, drawing from `gen` in slot order.
template <class T>
void initialize(const parameter_layout& layout, std::span<T> params, rng& gen) {
  for (const auto& s : layout) {
    auto out = params.subspan(s.offset, s.size());
    for (auto& v : out) {
      switch (s.init.what) {
        case init_rule::kind::zeros: v = T(0); break;
        case init_rule::kind::ones: v = T(1); break;
        case init_rule::kind::normal: v = static_cast<T>(s.init.scale * gen.normal()); break;
        case init_rule::kind::uniform:
          v = static_cast<T>(s.init.scale * (2.0 * gen.uniform() - 1.0));
          break;
        case init_rule::kind::constant: v = static_cast<T>(s.init.scale); break;
      }
    }
  }
}

/// A contiguous range [offset, offset + size) of a parameter vector.
struct parameter_range {
  std::size_t offset = 0;
  std::size_t size = 0;
};

/// Consecutive slots sharing the name before the first '.' ("down", "up", "lora_a", ...), merged
/// into ranges: the parameter groups AdaMix draws an expert for independently.
inline std::vector<parameter_range> parameter_groups(const parameter_layout& layout) {
  std::vector<parameter_range> out;
  std::string last;
  for (const auto& s : layout) {
    std::string prefix = s.name.substr(0, s.name.find('.'));
    if (out.empty() || prefix != last)
      out.push_back({s.offset, s.size()});
    else
      out.back().size += s.size();
    last = std::move(prefix);
  }
  return out;
}

}  // namespace smear
