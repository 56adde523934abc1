#pragma once
/// \file table.hpp
/// The examples' result tables: Markdown rows, fixed-point numbers, and the "mean ± standard
/// deviation" cells that summarise several seeds.

#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

namespace examples {

/// The mean of `v` (0 when empty).
inline double mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

/// The sample standard deviation of `v` (n − 1 in the denominator; 0 for fewer than two values).
inline double sample_std(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double m = mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

/// `x` with `digits` digits after the point.
inline std::string fixed(double x, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  return buf;
}

/// "m ± s" of the values times `scale` (100: percentages), or "m" for a single value.
inline std::string mean_std(const std::vector<double>& v, double scale = 1, int digits = 1) {
  std::string out = fixed(scale * mean(v), digits);
  if (v.size() > 1) out += " ± " + fixed(scale * sample_std(v), digits);
  return out;
}

/// "| a | b |\n".
inline std::string markdown_row(const std::vector<std::string>& cells) {
  std::string out = "|";
  for (const auto& c : cells) out += " " + c + " |";
  return out + "\n";
}

/// The header row and the separator row of a Markdown table.
inline std::string markdown_header(const std::vector<std::string>& columns) {
  std::string out = markdown_row(columns) + "|";
  for (std::size_t i = 0; i < columns.size(); ++i) out += "---|";
  return out + "\n";
}

}  // namespace examples
