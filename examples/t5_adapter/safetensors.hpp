#pragma once
/// \file safetensors.hpp
/// A small safetensors reader/writer for the T5 example (the format Hugging Face checkpoints
/// use: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
/// and byte range, then the raw data). Reads F32, F16 and BF16 tensors into floats, writes F32.
/// Every offset and size is checked against the file before use.

#include <nlohmann/json.hpp>
#include <smear/error.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace t5ex::safetensors {

/// A tensor to write: its name, shape and values.
struct tensor_view {
  std::string name;
  std::vector<std::size_t> shape;
  std::span<const float> values;
};

namespace detail {
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}
}  // namespace detail

/// A safetensors file read into memory.
class file {
 public:
  struct entry {
    std::string dtype;
    std::vector<std::size_t> shape;
    std::size_t begin = 0, end = 0;
  };

  file(std::string path, std::vector<char> data, std::size_t data_start, std::map<std::string, entry> entries)
      : path_(std::move(path)), data_(std::move(data)), start_(data_start), entries_(std::move(entries)) {}

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  const std::map<std::string, entry>& entries() const { return entries_; }

  /// Copies tensor `name` into `out` (converted to float), checking that its shape is `shape`.
  void copy_to(const std::string& name, const std::vector<std::size_t>& shape, std::span<float> out) const {
    const auto it = entries_.find(name);
    if (it == entries_.end())
      throw smear::io_error("safetensors: '" + path_ + "' has no tensor '" + name + "'");
    const entry& e = it->second;
    if (e.shape != shape) {
      std::string got, want;
      for (auto s : e.shape) got += std::to_string(s) + ",";
      for (auto s : shape) want += std::to_string(s) + ",";
      throw smear::io_error("safetensors: tensor '" + name + "' in '" + path_ + "' has shape [" + got +
                            "], expected [" + want + "]");
    }
    const char* p = data_.data() + start_ + e.begin;
    if (e.dtype == "F32") {
      std::memcpy(out.data(), p, out.size() * 4);
    } else if (e.dtype == "F16" || e.dtype == "BF16") {
      for (std::size_t i = 0; i < out.size(); ++i) {
        std::uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = e.dtype == "F16" ? detail::half_to_float(h)
                                  : std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
      }
    }
  }

 private:
  std::string path_;
  std::vector<char> data_;
  std::size_t start_;
  std::map<std::string, entry> entries_;
};

/// Reads and validates a safetensors file (little-endian hosts). Throws smear::io_error naming
/// the file and the problem.
inline file read(const std::string& path) {
  static_assert(std::endian::native == std::endian::little, "safetensors: little-endian hosts only");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw smear::io_error("safetensors: cannot open '" + path + "'");
  const auto size = static_cast<std::size_t>(in.tellg());
  in.seekg(0);
  std::vector<char> data(size);
  in.read(data.data(), static_cast<std::streamsize>(size));
  if (!in || size < 8) throw smear::io_error("safetensors: '" + path + "' is too short or unreadable");
  std::uint64_t n = 0;
  std::memcpy(&n, data.data(), 8);
  if (n > size - 8) throw smear::io_error("safetensors: '" + path + "' declares a header longer than the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(data.begin() + 8, data.begin() + 8 + static_cast<long>(n));
  } catch (const std::exception& e) {
    throw smear::io_error("safetensors: '" + path + "' has an unreadable header: " + e.what());
  }
  if (!header.is_object()) throw smear::io_error("safetensors: '" + path + "' header is not a JSON object");
  const std::size_t start = 8 + static_cast<std::size_t>(n), body = size - start;
  std::map<std::string, file::entry> entries;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      file::entry e;
      e.dtype = v.at("dtype").get<std::string>();
      e.shape = v.at("shape").get<std::vector<std::size_t>>();
      const auto off = v.at("data_offsets").get<std::vector<std::size_t>>();
      if (off.size() != 2) throw std::runtime_error("data_offsets must have 2 entries");
      e.begin = off[0];
      e.end = off[1];
      std::size_t count = 1;
      for (auto s : e.shape) {
        if (s != 0 && count > (std::size_t{1} << 40) / s) throw std::runtime_error("shape too large");
        count *= s;
      }
      const std::size_t width = e.dtype == "F32" ? 4 : (e.dtype == "F16" || e.dtype == "BF16") ? 2 : 0;
      if (width == 0) throw std::runtime_error("unsupported dtype " + e.dtype);
      if (e.begin > e.end || e.end > body || e.end - e.begin != count * width)
        throw std::runtime_error("data_offsets outside the file or not matching the shape");
      entries.emplace(name, std::move(e));
    } catch (const std::exception& ex) {
      throw smear::io_error("safetensors: tensor '" + name + "' in '" + path + "': " + ex.what());
    }
  }
  return file{path, std::move(data), start, std::move(entries)};
}

/// Writes F32 tensors (and string metadata) to `path`. Throws smear::io_error when it cannot.
inline void write(const std::string& path, const std::vector<tensor_view>& tensors,
                  const std::vector<std::pair<std::string, std::string>>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& m = header["__metadata__"];
    for (const auto& [k, v] : metadata) m[k] = v;
  }
  std::size_t offset = 0;
  for (const auto& t : tensors) {
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * t.values.size()}}};
    offset += 4 * t.values.size();
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  std::ofstream out(path, std::ios::binary);
  if (!out) throw smear::io_error("safetensors: cannot write '" + path + "'");
  const std::uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& t : tensors)
    out.write(reinterpret_cast<const char*>(t.values.data()), static_cast<std::streamsize>(4 * t.values.size()));
  if (!out) throw smear::io_error("safetensors: writing '" + path + "' failed");
}

}  // namespace t5ex::safetensors
