#pragma once
// The image files prepare_data writes, a generator of tiny synthetic ones for tests, and
// batching into NHWC float maps.
//
// File format (little endian): "SMEARIMG", u32 version = 1, u32 count, u32 channels,
// u32 height, u32 width; u16 label[count]; u8 domain[count]; u8 split[count] (0 train, 1 test);
// u32 object[count]; u8 pixels[count][channels][height][width] (NCHW). Class and domain names
// are in classes.txt and domains.txt next to it, one per line.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <smear/smear.hpp>

namespace imageset {

struct dataset {
  std::size_t count = 0, channels = 0, height = 0, width = 0;
  std::vector<std::int32_t> labels;
  std::vector<std::uint8_t> domains, splits;
  std::vector<std::uint32_t> objects;
  std::vector<std::uint8_t> pixels;  ///< NCHW
  std::vector<std::string> class_names, domain_names;

  std::size_t image_size() const { return channels * height * width; }
  std::size_t classes() const {
    std::int32_t m = -1;
    for (auto l : labels) m = std::max(m, l);
    return class_names.empty() ? static_cast<std::size_t>(m + 1) : class_names.size();
  }
  /// Indices of the images with this split (0 train, 1 test).
  std::vector<std::size_t> indices(std::uint8_t split) const {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < count; ++i)
      if (splits[i] == split) out.push_back(i);
    return out;
  }
};

namespace detail {
template <class V>
void put(std::ofstream& f, const V& v) {
  f.write(reinterpret_cast<const char*>(&v), sizeof(V));
}
template <class V>
void get(std::ifstream& f, V& v, const std::filesystem::path& path) {
  if (!f.read(reinterpret_cast<char*>(&v), sizeof(V)))
    throw smear::io_error(smear::detail::message("read image file ", path.string(), ": truncated header"));
}
template <class V>
void get_array(std::ifstream& f, std::vector<V>& v, std::size_t n, const std::filesystem::path& path,
               const char* what) {
  v.resize(n);
  if (!f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(V))))
    throw smear::io_error(smear::detail::message("read image file ", path.string(), ": truncated ", what,
                                                 " (expected ", n, " values)"));
}
inline std::vector<std::string> read_lines(const std::filesystem::path& path) {
  std::vector<std::string> out;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}
}  // namespace detail

/// Reads an image file, and the names in classes.txt / domains.txt beside it when present.
/// Throws smear::io_error naming the file.
inline dataset read(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw smear::io_error(smear::detail::message("read image file ", path.string(), ": cannot open"));
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "SMEARIMG", 8) != 0)
    throw smear::io_error(smear::detail::message("read image file ", path.string(), ": not an image file (bad magic)"));
  std::uint32_t version = 0, count = 0, c = 0, h = 0, w = 0;
  detail::get(f, version, path);
  if (version != 1)
    throw smear::io_error(smear::detail::message("read image file ", path.string(), ": version ", version,
                                                 ", this program reads version 1"));
  detail::get(f, count, path);
  detail::get(f, c, path);
  detail::get(f, h, path);
  detail::get(f, w, path);
  dataset d;
  d.count = count;
  d.channels = c;
  d.height = h;
  d.width = w;
  std::vector<std::uint16_t> labels;
  detail::get_array(f, labels, count, path, "labels");
  d.labels.assign(labels.begin(), labels.end());
  detail::get_array(f, d.domains, count, path, "domains");
  detail::get_array(f, d.splits, count, path, "splits");
  detail::get_array(f, d.objects, count, path, "objects");
  detail::get_array(f, d.pixels, d.count * d.image_size(), path, "pixels");
  const auto dir = path.parent_path();
  if (path.filename() != "mnist.bin") {
    d.class_names = detail::read_lines(dir / "classes.txt");
    d.domain_names = detail::read_lines(dir / "domains.txt");
  }
  return d;
}

/// Writes `d` as an image file and its names beside it.
inline void write(const std::filesystem::path& path, const dataset& d) {
  std::ofstream f(path, std::ios::binary);
  if (!f) throw smear::io_error(smear::detail::message("write image file ", path.string(), ": cannot open"));
  f.write("SMEARIMG", 8);
  for (std::size_t v : {std::size_t{1}, d.count, d.channels, d.height, d.width})
    detail::put(f, static_cast<std::uint32_t>(v));
  for (auto l : d.labels) detail::put(f, static_cast<std::uint16_t>(l));
  f.write(reinterpret_cast<const char*>(d.domains.data()), static_cast<std::streamsize>(d.domains.size()));
  f.write(reinterpret_cast<const char*>(d.splits.data()), static_cast<std::streamsize>(d.splits.size()));
  for (auto o : d.objects) detail::put(f, o);
  f.write(reinterpret_cast<const char*>(d.pixels.data()), static_cast<std::streamsize>(d.pixels.size()));
  if (!f) throw smear::io_error(smear::detail::message("write image file ", path.string(), ": write failed"));
  auto names = [&](const char* file, const std::vector<std::string>& v) {
    std::ofstream o(path.parent_path() / file);
    for (const auto& s : v) o << s << '\n';
  };
  if (!d.class_names.empty()) names("classes.txt", d.class_names);
  if (!d.domain_names.empty()) names("domains.txt", d.domain_names);
}

/// A synthetic multi-domain set: class = a shape (square, ring, cross, bar, triangle, ...),
/// domain = a drawing style (colours, outline or filled, inverted); `objects` shapes per class
/// with random size and position, each drawn in every domain; one object in five is test.
inline dataset make_tiny(std::uint64_t seed, std::size_t classes, std::size_t domains, std::size_t objects,
                         std::size_t size) {
  smear::rng gen{seed};
  dataset d;
  d.channels = 3;
  d.height = d.width = size;
  for (std::size_t c = 0; c < classes; ++c) d.class_names.push_back("shape" + std::to_string(c));
  for (std::size_t k = 0; k < domains; ++k) d.domain_names.push_back("style" + std::to_string(k));
  const double s = static_cast<double>(size);
  std::uint32_t object = 0;
  for (std::size_t c = 0; c < classes; ++c)
    for (std::size_t o = 0; o < objects; ++o, ++object) {
      const double cx = s * (0.4 + 0.2 * gen.uniform()), cy = s * (0.4 + 0.2 * gen.uniform());
      const double r = s * (0.2 + 0.15 * gen.uniform());
      const std::uint8_t split = (object % 5 == 4) ? 1 : 0;
      for (std::size_t k = 0; k < domains; ++k) {
        // style k: foreground/background colour pair; odd styles draw outlines only
        const std::uint8_t fg[3] = {static_cast<std::uint8_t>((k * 97) % 256), static_cast<std::uint8_t>((k * 53 + 40) % 256),
                                    static_cast<std::uint8_t>((k * 151 + 90) % 256)};
        const std::uint8_t bg[3] = {static_cast<std::uint8_t>(255 - fg[1]), static_cast<std::uint8_t>(255 - fg[2]),
                                    static_cast<std::uint8_t>(255 - fg[0])};
        const bool outline = k % 2 == 1;
        for (std::size_t y = 0; y < size; ++y)
          for (std::size_t x = 0; x < size; ++x) {
            const double dx = (static_cast<double>(x) + 0.5 - cx) / r, dy = (static_cast<double>(y) + 0.5 - cy) / r;
            const double ax = std::abs(dx), ay = std::abs(dy), rr = std::sqrt(dx * dx + dy * dy);
            double v = 0;  // signed "inside" measure: > 0 inside the shape
            switch (c % 6) {
              case 0: v = 1 - std::max(ax, ay); break;                          // square
              case 1: v = 0.25 - std::abs(rr - 0.75); break;                    // ring
              case 2: v = std::max(0.3 - ax, 0.3 - ay) * (rr < 1 ? 1 : -1); break;  // cross
              case 3: v = std::min(0.35 - ay, 1 - ax); break;                   // horizontal bar
              case 4: v = std::min(dy + 0.8, 0.8 - dy - 2 * ax * 0.8 / 1.0) ; break;  // triangle
              default: v = std::min(0.35 - ax, 1 - ay); break;                  // vertical bar
            }
            if (c >= 6) v = -v * (rr < 1 ? 1 : -1);  // further classes: complements inside the disc
            const bool on = outline ? std::abs(v) < 0.12 : v > 0;
            for (std::size_t ch = 0; ch < 3; ++ch) d.pixels.push_back(on ? fg[ch] : bg[ch]);
          }
        // pixels were written HWC; convert this image to CHW in place
        const std::size_t base = d.pixels.size() - 3 * size * size;
        std::vector<std::uint8_t> hwc(d.pixels.begin() + static_cast<std::ptrdiff_t>(base), d.pixels.end());
        smear::nhwc_to_nchw(std::span<const std::uint8_t>(hwc),
                            std::span<std::uint8_t>(d.pixels.data() + base, hwc.size()), {1, 3, size, size});
        d.labels.push_back(static_cast<std::int32_t>(c));
        d.domains.push_back(static_cast<std::uint8_t>(k));
        d.splits.push_back(split);
        d.objects.push_back(object);
        ++d.count;
      }
    }
  return d;
}

/// Images `idx` as an NHWC float batch in [-1, 1] with 3 channels (a one-channel image is
/// repeated; `invert` maps v to 255 − v first, e.g. white-on-black digits to dark strokes on
/// white like the emoji).
inline void batch(const dataset& d, std::span<const std::size_t> idx, std::vector<float>& out, bool invert = false) {
  const std::size_t hw = d.height * d.width, n = idx.size();
  out.resize(n * hw * 3);
  std::vector<float> chw(3 * hw);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t* src = d.pixels.data() + idx[i] * d.image_size();
    for (std::size_t ch = 0; ch < 3; ++ch) {
      const std::uint8_t* plane = src + (d.channels == 1 ? 0 : ch) * hw;
      for (std::size_t p = 0; p < hw; ++p) {
        const float v = invert ? 255.0f - static_cast<float>(plane[p]) : static_cast<float>(plane[p]);
        chw[ch * hw + p] = v / 127.5f - 1.0f;
      }
    }
    smear::nchw_to_nhwc(std::span<const float>(chw), std::span<float>(out.data() + i * hw * 3, hw * 3),
                        {1, 3, d.height, d.width});
  }
}

}  // namespace imageset
