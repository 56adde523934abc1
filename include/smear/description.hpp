#pragma once
/// \file description.hpp
/// What an object computes, as ordered `key=value` pairs: a layer's expert type and options,
/// N, the residual, the router's and the strategy's options. Checkpoints record a layer's
/// description and compare it with the layer they load into (smear/io/checkpoint.hpp).
/// Experts describe themselves with an optional `describe(description&) const`; the built-in
/// ones do, and for others the layer records the parameter layout.

#include <cstddef>
#include <iomanip>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace smear {

class description {
 public:
  /// Appends `key=value`: bools as true/false, floating-point values with enough digits to
  /// round-trip, anything else through operator<<.
  template <class V>
  description& add(std::string key, const V& value) {
    std::ostringstream out;
    if constexpr (std::is_same_v<V, bool>)
      out << (value ? "true" : "false");
    else if constexpr (std::is_floating_point_v<V>)
      out << std::setprecision(std::numeric_limits<V>::max_digits10) << value;
    else
      out << value;
    entries_.emplace_back(std::move(key), out.str());
    return *this;
  }

  const std::vector<std::pair<std::string, std::string>>& entries() const noexcept { return entries_; }
  /// The value of `key`, or nothing.
  std::optional<std::string> find(std::string_view key) const {
    for (const auto& [k, v] : entries_)
      if (k == key) return v;
    return std::nullopt;
  }

  /// "k1=v1; k2=v2"
  std::string str() const {
    std::string out;
    for (const auto& [k, v] : entries_) out += (out.empty() ? "" : "; ") + k + "=" + v;
    return out;
  }
  /// The inverse of str(); nothing when `text` is not of that form.
  static std::optional<description> parse(std::string_view text) {
    description d;
    while (!text.empty()) {
      const auto end = text.find("; ");
      const std::string_view item = text.substr(0, end);
      const auto eq = item.find('=');
      if (eq == std::string_view::npos || eq == 0) return std::nullopt;
      d.entries_.emplace_back(std::string(item.substr(0, eq)), std::string(item.substr(eq + 1)));
      text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 2);
    }
    return d;
  }

  /// "a is X in `left_name`, Y in `right_name`; ..." for every key whose values differ (or that
  /// only one has); empty when they agree.
  static std::string differences(const description& left, const description& right, std::string_view left_name,
                                 std::string_view right_name) {
    std::string out;
    auto note = [&](const std::string& key, const std::optional<std::string>& l, const std::optional<std::string>& r) {
      if (l == r) return;
      out += (out.empty() ? "" : "; ") + key + " is " + (l ? *l : "absent") + " in " + std::string(left_name) + ", " +
             (r ? *r : "absent") + " in " + std::string(right_name);
    };
    for (const auto& [k, v] : left.entries_) note(k, v, right.find(k));
    for (const auto& [k, v] : right.entries_)
      if (!left.find(k)) note(k, std::nullopt, v);
    return out;
  }

 private:
  std::vector<std::pair<std::string, std::string>> entries_;
};

}  // namespace smear
