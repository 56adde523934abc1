#pragma once
/// \file heatmap.hpp
/// Routing heatmaps: the mean routing distribution per group of examples (a task, a domain)
/// and routing block, drawn as one SVG with a rows × experts grid per block, titles and a
/// legend, and copied to PNG with rsvg-convert when it is on the PATH. A figure that cannot be
/// written is reported on stderr; it never stops a run.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace examples {

/// Sums the routing distributions of many batches per group of examples and routing block.
class routing_means {
 public:
  explicit routing_means(std::size_t groups) : count_(groups, 0) {}

  /// One batch: example i is in group `groups[i]`; `block_routing(k)` is routing block k's
  /// distribution of this batch, [B, experts], for k < `blocks`.
  template <class Group, class Routing>
  void add(std::span<const Group> groups, std::size_t blocks, Routing&& block_routing) {
    for (auto g : groups) ++count_.at(static_cast<std::size_t>(g));
    if (sums_.size() < blocks) sums_.resize(blocks);
    for (std::size_t k = 0; k < blocks; ++k) {
      const auto p = block_routing(k);
      const std::size_t E = p.cols;
      sums_[k].resize(count_.size() * E, 0.0);
      for (std::size_t i = 0; i < groups.size() && i < p.rows; ++i)
        for (std::size_t e = 0; e < E; ++e)
          sums_[k][static_cast<std::size_t>(groups[i]) * E + e] += static_cast<double>(p(i, e));
    }
  }

  /// Per routing block, [groups × experts] row-major: the mean distribution of each group's
  /// examples (0 for a group without examples).
  std::vector<std::vector<double>> means() const {
    auto out = sums_;
    for (auto& block : out) {
      const std::size_t E = block.size() / std::max<std::size_t>(count_.size(), 1);
      for (std::size_t g = 0; g < count_.size(); ++g)
        for (std::size_t e = 0; e < E; ++e)
          block[g * E + e] /= static_cast<double>(std::max<std::size_t>(count_[g], 1));
    }
    return out;
  }

 private:
  std::vector<std::size_t> count_;
  std::vector<std::vector<double>> sums_;
};

/// One figure: a grid of rows × columns cells per panel (routing block), the same rows in every
/// panel.
struct heatmap {
  struct panel {
    std::string title;           ///< above the grid ("block 1", "layer 0 attention")
    std::vector<double> values;  ///< rows × columns, row-major
  };
  std::string title;                   ///< the figure's first line
  std::string subtitle;                ///< its second line (may be empty)
  std::vector<std::string> rows;       ///< row labels (tasks, domains)
  std::size_t columns = 0;             ///< cells per row (experts)
  std::string column_name = "expert";  ///< in each cell's tooltip: "<row>, expert 3: 0.25"
  std::vector<panel> panels;
  std::size_t panels_per_line = 4;     ///< panels side by side before the next line
  double darkest = 0;                  ///< the value drawn darkest (0: the largest value)
};

namespace detail {

/// `s` with the characters XML gives a meaning replaced by entities.
inline std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

/// `s` as one shell word: in single quotes, each ' written as '\''.
inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// The fill of a cell of value v: white at 0, blue at `darkest`.
inline std::string fill(double v, double darkest) {
  const double t = std::clamp(v / darkest, 0.0, 1.0);
  const auto shade = std::lround(255 * (1 - t));
  return "rgb(" + std::to_string(shade) + "," + std::to_string(shade) + ",255)";
}

}  // namespace detail

/// The SVG of `h`.
inline std::string heatmap_svg(const heatmap& h) {
  constexpr std::size_t cell = 18, gap = 24, pad = 8, line = 16;
  constexpr std::size_t char_w = 7, text_char_w = 6;  // generous widths of a character: labels, titles
  double darkest = h.darkest;
  if (darkest <= 0) {
    darkest = 1e-9;
    for (const auto& p : h.panels)
      for (double v : p.values) darkest = std::max(darkest, v);
  }
  std::size_t label_w = 0;
  for (const auto& r : h.rows) label_w = std::max(label_w, r.size() * char_w);
  label_w += pad;
  const std::size_t per_line = std::max<std::size_t>(1, std::min(h.panels_per_line, h.panels.size()));
  const std::size_t lines = (h.panels.size() + per_line - 1) / per_line;
  const std::size_t panel_w = h.columns * cell + gap, panel_h = line + h.rows.size() * cell + gap;
  const std::size_t top = pad + line * (h.subtitle.empty() ? 2 : 3);
  const std::size_t legend_y = top + lines * panel_h;
  std::ostringstream top_label;  // the legend's label of its dark end
  top_label << darkest << (h.darkest > 0 ? "" : " (the largest value)");
  const std::size_t bar_x = pad + 4 * char_w, bar_w = 10 * cell, bar_label_x = bar_x + bar_w + char_w;
  const std::size_t text_w = std::max({2 * pad + text_char_w * std::max(h.title.size(), h.subtitle.size()),
                                       bar_label_x + pad + text_char_w * top_label.str().size()});
  const std::size_t W = std::max(pad + label_w + per_line * panel_w, text_w), H = legend_y + 2 * line;

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"" << pad << "\" y=\"" << pad + line - 2 << "\" font-size=\"13\">" << detail::xml_escape(h.title)
    << "</text>\n";
  if (!h.subtitle.empty())
    o << "<text x=\"" << pad << "\" y=\"" << pad + 2 * line - 2 << "\">" << detail::xml_escape(h.subtitle)
      << "</text>\n";
  for (std::size_t k = 0; k < h.panels.size(); ++k) {
    const auto& p = h.panels[k];
    const std::size_t x0 = pad + label_w + (k % per_line) * panel_w, y0 = top + (k / per_line) * panel_h;
    o << "<text x=\"" << x0 << "\" y=\"" << y0 + line - 4 << "\">" << detail::xml_escape(p.title) << "</text>\n";
    for (std::size_t r = 0; r < h.rows.size(); ++r) {
      const std::size_t y = y0 + line + r * cell;
      const std::string row = detail::xml_escape(h.rows[r]);
      if (k % per_line == 0)
        o << "<text x=\"" << x0 - pad / 2 << "\" y=\"" << y + 13 << "\" text-anchor=\"end\">" << row << "</text>\n";
      for (std::size_t e = 0; e < h.columns; ++e) {
        const std::size_t i = r * h.columns + e;
        const double v = i < p.values.size() ? p.values[i] : 0.0;
        o << "<rect x=\"" << x0 + e * cell << "\" y=\"" << y << "\" width=\"" << cell << "\" height=\"" << cell
          << "\" fill=\"" << detail::fill(v, darkest) << "\" stroke=\"#ccc\"><title>" << row << ", "
          << detail::xml_escape(h.column_name) << " " << e << ": " << v << "</title></rect>\n";
      }
    }
  }
  // legend: a white-to-blue bar from 0 to the darkest value
  o << "<defs><linearGradient id=\"scale\"><stop offset=\"0\" stop-color=\"rgb(255,255,255)\"/>"
    << "<stop offset=\"1\" stop-color=\"rgb(0,0,255)\"/></linearGradient></defs>\n"
    << "<text x=\"" << pad << "\" y=\"" << legend_y + 11 << "\">0</text>\n"
    << "<rect x=\"" << bar_x << "\" y=\"" << legend_y << "\" width=\"" << bar_w << "\" height=\"" << cell / 2 + 4
    << "\" fill=\"url(#scale)\" stroke=\"#ccc\"/>\n"
    << "<text x=\"" << bar_label_x << "\" y=\"" << legend_y + 11 << "\">" << top_label.str() << "</text>\n</svg>\n";
  return o.str();
}

/// Copies `svg` to the same name with .png, with rsvg-convert, when rsvg-convert is on the
/// PATH. Returns whether a PNG was written; a failure is reported on stderr.
inline bool png_copy(const std::filesystem::path& svg) {
  static const bool available = std::system("command -v rsvg-convert > /dev/null 2>&1") == 0;
  if (!available) return false;
  std::filesystem::path png = svg;
  png.replace_extension(".png");
  const std::string cmd =
      "rsvg-convert -o " + detail::shell_quote(png.string()) + " " + detail::shell_quote(svg.string());
  if (std::system(cmd.c_str()) != 0) {
    std::cerr << "rsvg-convert failed for " << svg.string() << " (the SVG is kept, no PNG)\n";
    return false;
  }
  return true;
}

/// Writes `h` to `svg` (and its PNG copy, see png_copy). Returns whether the SVG was written;
/// a failure is reported on stderr.
inline bool write_heatmap(const heatmap& h, const std::filesystem::path& svg) {
  {
    std::ofstream out(svg);
    out << heatmap_svg(h);
    if (!out) {
      std::cerr << "cannot write the heatmap " << svg.string() << '\n';
      return false;
    }
  }
  png_copy(svg);
  return true;
}

}  // namespace examples
