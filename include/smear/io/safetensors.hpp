#pragma once
/// \file io/safetensors.hpp
/// Reading and writing the safetensors format (the format of Hugging Face's `safetensors`
/// package, which PyTorch, JAX and others use for checkpoints):
///
///     [8 bytes]  N, the header's length, unsigned 64-bit little-endian
///     [N bytes]  a UTF-8 JSON object: for each tensor
///                  "name": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
///                and optionally "__metadata__": {"key": "value", ...} (strings only)
///     [rest]     the data: tensor bytes, row-major, little-endian, [begin, end) counted from
///                the first byte after the header
///
/// The reader treats every file as hostile. Before a byte of data is used it checks: the
/// header length against the file, the JSON itself (nesting depth, duplicate names, the type of
/// every field), the dtype against the known ones, each shape's element count and byte count
/// for overflow, each byte range against the data and against the tensor's size, and the ranges
/// against each other (no overlap, no gap, the data fully covered — what the reference
/// implementation requires). Any failure is a smear::io_error naming the file and, where one is
/// involved, the tensor.
///
/// This header needs nlohmann/json (Debian: nlohmann-json3-dev); link the `smear::io` CMake
/// target, which adds it. It is not included by <smear/smear.hpp>.

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#if __has_include(<unistd.h>) && __has_include(<fcntl.h>)
#include <fcntl.h>
#include <unistd.h>
#define SMEAR_IO_POSIX 1
#else
#define SMEAR_IO_POSIX 0
#endif

#include "smear/error.hpp"

namespace smear {

/// The element types of the safetensors format. smear reads and writes the floating-point
/// ones (f16, bf16, f32, f64); the others are recognised, so a file holding them opens and
/// its other tensors can be read. (The sub-byte types of recent versions, F4 and F6_*, are
/// not: a file holding them is rejected as having an unknown dtype.)
enum class dtype {
  boolean, u8, i8, f8_e5m2, f8_e4m3, f8_e8m0, i16, u16, f16, bf16, i32, u32, f32, i64, u64, f64, c64
};

/// The name of `t` in a safetensors header ("F32", "BF16", ...).
constexpr std::string_view to_string(dtype t) noexcept {
  switch (t) {
    case dtype::boolean: return "BOOL";
    case dtype::u8: return "U8";
    case dtype::i8: return "I8";
    case dtype::f8_e5m2: return "F8_E5M2";
    case dtype::f8_e4m3: return "F8_E4M3";
    case dtype::f8_e8m0: return "F8_E8M0";
    case dtype::i16: return "I16";
    case dtype::u16: return "U16";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i32: return "I32";
    case dtype::u32: return "U32";
    case dtype::f32: return "F32";
    case dtype::i64: return "I64";
    case dtype::u64: return "U64";
    case dtype::f64: return "F64";
    case dtype::c64: return "C64";
  }
  return "?";
}

/// The dtype called `name` in a safetensors header, or nothing for an unknown name.
constexpr std::optional<dtype> parse_dtype(std::string_view name) noexcept {
  constexpr std::array all{dtype::boolean, dtype::u8,  dtype::i8,      dtype::f8_e5m2, dtype::f8_e4m3,
                           dtype::f8_e8m0, dtype::i16, dtype::u16,     dtype::f16,     dtype::bf16,
                           dtype::i32,     dtype::u32, dtype::f32,     dtype::i64,     dtype::u64,
                           dtype::f64,     dtype::c64};
  for (dtype t : all)
    if (to_string(t) == name) return t;
  return std::nullopt;
}

/// Bytes per element of `t`.
constexpr std::size_t dtype_size(dtype t) noexcept {
  switch (t) {
    case dtype::boolean: case dtype::u8: case dtype::i8: case dtype::f8_e5m2: case dtype::f8_e4m3:
    case dtype::f8_e8m0:
      return 1;
    case dtype::i16: case dtype::u16: case dtype::f16: case dtype::bf16: return 2;
    case dtype::i32: case dtype::u32: case dtype::f32: return 4;
    case dtype::i64: case dtype::u64: case dtype::f64: case dtype::c64: return 8;
  }
  return 0;
}

/// Whether smear converts `t` to and from float and double.
constexpr bool is_floating(dtype t) noexcept {
  return t == dtype::f16 || t == dtype::bf16 || t == dtype::f32 || t == dtype::f64;
}

/// The dtype that stores a T as is: f32 for float, f64 for double.
template <class T>
  requires std::is_same_v<T, float> || std::is_same_v<T, double>
inline constexpr dtype native_dtype = std::is_same_v<T, float> ? dtype::f32 : dtype::f64;

namespace detail {

/// A small IEEE binary format with `E` exponent bits and `M` mantissa bits (binary16: 5, 10;
/// bfloat16: 8, 7), decoded exactly to double.
template <int E, int M>
double decode_small_float(std::uint16_t bits) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  const bool negative = (bits >> (E + M)) & 1u;
  const unsigned exponent = (bits >> M) & ((1u << E) - 1u);
  const unsigned mantissa = bits & ((1u << M) - 1u);
  double v;
  if (exponent == (1u << E) - 1u)
    v = mantissa == 0 ? std::numeric_limits<double>::infinity()
                      : std::numeric_limits<double>::quiet_NaN();
  else if (exponent == 0)
    v = std::ldexp(static_cast<double>(mantissa), 1 - bias - M);
  else
    v = std::ldexp(static_cast<double>(mantissa | (1u << M)), static_cast<int>(exponent) - bias - M);
  return negative ? -v : v;
}

/// `v` rounded to the nearest value of the small format (ties to even), overflowing to ±∞;
/// NaN becomes a quiet NaN of the same sign. Exact for float and double inputs (no double
/// rounding), independent of the floating-point environment.
template <int E, int M>
std::uint16_t encode_small_float(double v) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr unsigned inf = ((1u << E) - 1u) << M;
  const unsigned sign = std::signbit(v) ? 1u << (E + M) : 0u;
  if (std::isnan(v)) return static_cast<std::uint16_t>(sign | inf | (1u << (M - 1)));
  const double a = std::fabs(v);
  if (std::isinf(a)) return static_cast<std::uint16_t>(sign | inf);
  if (a == 0.0) return static_cast<std::uint16_t>(sign);
  int k = 0;
  (void)std::frexp(a, &k);  // a = f·2^k, f in [0.5, 1): unbiased exponent k - 1
  int exponent = std::max(k - 1, 1 - bias);  // subnormals share the smallest normal's scale
  // q: a in units of the last mantissa place at this exponent; < 2^(M+1), so exact in double
  const double q = std::ldexp(a, M - exponent);
  double r = std::floor(q);
  const double frac = q - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  auto units = static_cast<unsigned>(r);
  if (units >= (2u << M)) {  // rounded up to the next binade
    units >>= 1;
    ++exponent;
  }
  if (exponent > bias) return static_cast<std::uint16_t>(sign | inf);
  if (units < (1u << M)) return static_cast<std::uint16_t>(sign | units);  // subnormal (or zero)
  const auto biased = static_cast<unsigned>(exponent + bias);
  return static_cast<std::uint16_t>(sign | (biased << M) | (units & ((1u << M) - 1u)));
}

inline std::uint64_t load_le(const unsigned char* p, std::size_t n) noexcept {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}

inline void store_le(unsigned char* p, std::uint64_t v, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

/// Element i of a floating-point tensor's raw little-endian bytes, as T.
template <class T>
T decode_element(dtype t, const unsigned char* p) noexcept {
  switch (t) {
    case dtype::f16:
      return static_cast<T>(decode_small_float<5, 10>(static_cast<std::uint16_t>(load_le(p, 2))));
    case dtype::bf16:
      return static_cast<T>(decode_small_float<8, 7>(static_cast<std::uint16_t>(load_le(p, 2))));
    case dtype::f32:
      return static_cast<T>(std::bit_cast<float>(static_cast<std::uint32_t>(load_le(p, 4))));
    case dtype::f64: return static_cast<T>(std::bit_cast<double>(load_le(p, 8)));
    default: return T(0);
  }
}

/// Writes `v` as one element of floating-point dtype `t`.
template <class T>
void encode_element(dtype t, T v, unsigned char* p) noexcept {
  switch (t) {
    case dtype::f16: store_le(p, encode_small_float<5, 10>(static_cast<double>(v)), 2); break;
    case dtype::bf16: store_le(p, encode_small_float<8, 7>(static_cast<double>(v)), 2); break;
    case dtype::f32: store_le(p, std::bit_cast<std::uint32_t>(static_cast<float>(v)), 4); break;
    case dtype::f64: store_le(p, std::bit_cast<std::uint64_t>(static_cast<double>(v)), 8); break;
    default: break;
  }
}

/// "[a, b, c]" for a shape held in a vector.
inline std::string shape_string(std::span<const std::size_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace detail

/// One tensor of a safetensors file: its name, dtype, shape, and byte range in the data.
struct tensor_info {
  std::string name;
  smear::dtype type = dtype::f32;
  std::vector<std::size_t> shape;
  std::size_t begin = 0;  ///< first byte, counted from the start of the data
  std::size_t end = 0;    ///< one past the last byte

  /// Number of elements (1 for a scalar, shape []).
  std::size_t elements() const noexcept {
    std::size_t n = 1;
    for (auto d : shape) n *= d;  // checked for overflow when the file was opened
    return n;
  }
};

/// The largest header the reader accepts (the reference implementation's limit, 100 MB).
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

/// A safetensors file held in memory, its header parsed and checked.
///
/// Example:
/// ```
/// auto file = smear::safetensors_file::open("model.safetensors");
/// for (const auto& t : file.tensors()) std::cout << t.name << '\n';
/// std::vector<float> w = file.read<float>("block.0.experts.down.weight");
/// ```
class safetensors_file {
 public:
  /// Reads and checks the file at `path`. Throws io_error naming the file when it cannot be
  /// read or is not a valid safetensors file.
  static safetensors_file open(const std::filesystem::path& path) {
    const std::string where = path.string();
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    if (ec)
      throw io_error(detail::message("safetensors: cannot read '", where, "': ", ec.message()));
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error(detail::message("safetensors: cannot open '", where, "'"));
    std::vector<unsigned char> bytes;
    if (size > static_cast<std::uintmax_t>(std::numeric_limits<std::streamsize>::max()))
      throw io_error(detail::message("safetensors: '", where, "' is too large (", size, " bytes)"));
    bytes.resize(static_cast<std::size_t>(size));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (static_cast<std::uintmax_t>(in.gcount()) != size)
      throw io_error(detail::message("safetensors: '", where, "': read ", in.gcount(), " of ", size,
                                     " bytes (the file changed or could not be read)"));
    return safetensors_file(std::move(bytes), where);
  }

  /// Checks a safetensors file held in `bytes` (copied); `name` stands for the file in messages.
  static safetensors_file parse(std::span<const unsigned char> bytes, std::string name = "<memory>") {
    return safetensors_file(std::vector<unsigned char>(bytes.begin(), bytes.end()), std::move(name));
  }

  /// The file's name, as used in messages.
  const std::string& name() const noexcept { return name_; }
  /// Every tensor, in the order of their data.
  const std::vector<tensor_info>& tensors() const noexcept { return tensors_; }
  /// The `__metadata__` entries.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }

  /// The tensor called `tensor`, or nullptr.
  const tensor_info* find(std::string_view tensor) const noexcept {
    auto it = index_.find(tensor);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  bool contains(std::string_view tensor) const noexcept { return find(tensor) != nullptr; }

  /// The tensor called `tensor`; throws io_error naming the file and the tensor when absent.
  const tensor_info& at(std::string_view tensor) const {
    if (const auto* t = find(tensor)) return *t;
    throw io_error(detail::message("safetensors: '", name_, "' has no tensor '", tensor, "' (it holds ",
                                   tensors_.size(), " tensors", hint(tensor), ")"));
  }

  /// The raw little-endian bytes of `tensor`.
  std::span<const unsigned char> raw(std::string_view tensor) const {
    const auto& t = at(tensor);
    return std::span<const unsigned char>(bytes_).subspan(data_ + t.begin, t.end - t.begin);
  }

  /// Converts `tensor` (F16, BF16, F32 or F64) to T into `out`, which must have exactly its
  /// element count. Throws io_error naming the file and the tensor otherwise.
  template <class T>
    requires std::is_floating_point_v<T>
  void read(std::string_view tensor, std::span<T> out) const {
    const auto& t = at(tensor);
    if (!is_floating(t.type))
      throw io_error(detail::message("safetensors: '", name_, "': tensor '", t.name, "' has dtype ",
                                     to_string(t.type), "; smear reads F16, BF16, F32 and F64"));
    if (out.size() != t.elements())
      throw io_error(detail::message("safetensors: '", name_, "': tensor '", t.name, "' ",
                                     detail::shape_string(t.shape), " has ", t.elements(),
                                     " elements, the destination has ", out.size()));
    const unsigned char* p = bytes_.data() + data_ + t.begin;
    const std::size_t w = dtype_size(t.type);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = detail::decode_element<T>(t.type, p + i * w);
  }

  /// `tensor` converted to T.
  template <class T>
    requires std::is_floating_point_v<T>
  std::vector<T> read(std::string_view tensor) const {
    std::vector<T> out(at(tensor).elements());
    read(tensor, std::span<T>(out));
    return out;
  }

 private:
  safetensors_file(std::vector<unsigned char> bytes, std::string name)
      : bytes_(std::move(bytes)), name_(std::move(name)) {
    check();
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw io_error(detail::message("safetensors: '", name_, "': ", what));
  }

  std::string hint(std::string_view tensor) const {
    // name a tensor with the same last component, to help map other naming schemes
    const auto dot = tensor.rfind('.');
    const std::string_view last = dot == std::string_view::npos ? tensor : tensor.substr(dot + 1);
    std::string similar;
    std::size_t shown = 0;
    for (const auto& t : tensors_) {
      if (shown == 3) break;
      if (t.name.size() >= last.size() && t.name.compare(t.name.size() - last.size(), last.size(), last) == 0) {
        similar += (shown ? "', '" : "") + t.name;
        ++shown;
      }
    }
    return similar.empty() ? std::string{} : "; similar: '" + similar + "'";
  }

  void check() {
    const std::size_t size = bytes_.size();
    if (size < 8)
      fail(detail::message("truncated: ", size, " bytes, shorter than the 8-byte header length"));
    const std::uint64_t n = detail::load_le(bytes_.data(), 8);
    if (n > size - 8)
      fail(detail::message("the header length ", n, " runs past the end of the file (", size,
                           " bytes): truncated or not a safetensors file"));
    if (n > safetensors_max_header)
      fail(detail::message("the header length ", n, " exceeds the limit of ", safetensors_max_header,
                           " bytes"));
    if (n < 2 || bytes_[8] != '{')
      fail("the header is not a JSON object (it must start with '{')");
    data_ = 8 + static_cast<std::size_t>(n);
    const std::size_t data_size = size - data_;

    // Parse, rejecting deep nesting and duplicate names while parsing (nlohmann/json would
    // otherwise keep only the last of two equal keys).
    std::set<std::string, std::less<>> seen;
    const auto* first = reinterpret_cast<const char*>(bytes_.data() + 8);
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(
          first, first + n,
          [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
            if (depth > 3) fail("the header nests deeper than a safetensors header does");
            if (event == nlohmann::json::parse_event_t::key && depth == 1) {
              const auto& key = parsed.get_ref<const std::string&>();
              if (!seen.insert(key).second) fail(detail::message("duplicate tensor name '", key, "'"));
            }
            return true;
          });
    } catch (const nlohmann::json::exception& e) {
      fail(detail::message("the header is not valid JSON: ", e.what()));
    }
    if (!header.is_object()) fail("the header is not a JSON object");

    std::vector<std::size_t> order;
    for (auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        if (!entry.is_object()) fail("__metadata__ is not an object of strings");
        for (auto& [mk, mv] : entry.items()) {
          if (!mv.is_string()) fail(detail::message("__metadata__ entry '", mk, "' is not a string"));
          metadata_.emplace(mk, mv.get<std::string>());
        }
        continue;
      }
      tensors_.push_back(parse_entry(key, entry, data_size));
    }
    // ranges: sorted by begin, each starting where the previous ended, covering the data
    std::vector<std::size_t> by_begin(tensors_.size());
    for (std::size_t i = 0; i < by_begin.size(); ++i) by_begin[i] = i;
    std::sort(by_begin.begin(), by_begin.end(), [&](std::size_t a, std::size_t b) {
      return std::pair(tensors_[a].begin, tensors_[a].end) < std::pair(tensors_[b].begin, tensors_[b].end);
    });
    std::size_t next = 0;
    const tensor_info* previous = nullptr;
    for (std::size_t i : by_begin) {
      const auto& t = tensors_[i];
      if (t.begin < next)
        fail(detail::message("tensor '", t.name, "' bytes [", t.begin, ", ", t.end, ") overlap tensor '",
                             previous->name, "' bytes [", previous->begin, ", ", previous->end, ")"));
      if (t.begin > next)
        fail(detail::message("tensor '", t.name, "' starts at byte ", t.begin, " but the previous data ends at ",
                             next, ": the data has a gap"));
      next = t.end;
      previous = &t;
    }
    if (next != data_size)
      fail(detail::message("the tensors cover ", next, " bytes of data but the file holds ", data_size,
                           " after the header"));
    std::vector<tensor_info> sorted;
    sorted.reserve(tensors_.size());
    for (std::size_t i : by_begin) sorted.push_back(std::move(tensors_[i]));
    tensors_ = std::move(sorted);
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  tensor_info parse_entry(const std::string& key, const nlohmann::json& entry, std::size_t data_size) const {
    auto bad = [&](const std::string& what) {
      fail(detail::message("tensor '", key, "': ", what));
    };
    if (!entry.is_object()) bad("the entry is not an object with dtype, shape and data_offsets");
    for (auto& [field, value] : entry.items()) {
      (void)value;
      if (field != "dtype" && field != "shape" && field != "data_offsets")
        bad(detail::message("unknown field '", field, "'"));
    }
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || sh == entry.end() || off == entry.end())
      bad("the entry needs dtype, shape and data_offsets");
    if (!dt->is_string()) bad("dtype is not a string");
    const auto type = parse_dtype(dt->get_ref<const std::string&>());
    if (!type) bad(detail::message("unknown dtype '", dt->get_ref<const std::string&>(), "'"));
    tensor_info t;
    t.name = key;
    t.type = *type;
    if (!sh->is_array()) bad("shape is not an array");
    std::uint64_t elements = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned()) bad("shape holds something other than a non-negative integer");
      const auto v = d.get<std::uint64_t>();
      const auto product = detail::checked_mul(elements, v);
      if (!product || v > std::numeric_limits<std::size_t>::max())
        bad(detail::message("the shape's element count overflows (", d, " after ", elements, ")"));
      elements = *product;
      t.shape.push_back(static_cast<std::size_t>(v));
    }
    const auto bytes = detail::checked_mul(elements, dtype_size(t.type));
    if (!bytes) bad(detail::message("the byte count of shape ", sh->dump(), " overflows"));
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      bad("data_offsets is not [begin, end] with non-negative integers");
    const auto begin = (*off)[0].get<std::uint64_t>();
    const auto end = (*off)[1].get<std::uint64_t>();
    if (begin > end || end > data_size)
      bad(detail::message("data_offsets [", begin, ", ", end, ") lie outside the data (", data_size,
                          " bytes)"));
    if (end - begin != *bytes)
      bad(detail::message("data_offsets [", begin, ", ", end, ") hold ", end - begin, " bytes, but ",
                          to_string(t.type), " ", detail::shape_string(t.shape), " needs ", *bytes));
    t.begin = static_cast<std::size_t>(begin);
    t.end = static_cast<std::size_t>(end);
    return t;
  }

  std::vector<unsigned char> bytes_;
  std::string name_;
  std::size_t data_ = 0;  // where the data starts
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and writes them as one safetensors file.
///
/// Tensors are converted to their stored dtype when added; the file lists them in the order
/// added, each aligned to 8 bytes (the header is padded with spaces, as the reference writer does).
///
/// Example:
/// ```
/// smear::safetensors_writer out;
/// out.add("weight", std::span<const float>(w), {rows, cols});               // F32
/// out.add("bias", std::span<const float>(b), {cols}, smear::dtype::bf16);   // stored as BF16
/// out.save("model.safetensors");
/// ```
/// What a safetensors_writer does with a finite value that the stored dtype cannot hold: one
/// beyond its largest finite value (which would become ±Inf) or a non-zero one below its
/// smallest subnormal (which would become 0).
enum class narrowing {
  refuse,    ///< value_error naming the tensor, the index and the value
  saturate,  ///< store ±the largest finite value, or 0, and count it (saturated())
};

class safetensors_writer {
 public:
  /// Adds `values` as tensor `name` of shape `shape`, stored as `as` (default: T as is).
  /// Throws value_error for a duplicate or reserved name, a non-floating-point dtype, a
  /// shape whose element count differs from values.size(), or (under narrowing::refuse, see
  /// set_narrowing) a finite value the dtype cannot hold; NaN and ±Inf are stored as they are.
  template <class T>
    requires std::is_floating_point_v<T>
  void add(std::string name, std::span<const T> values, std::vector<std::size_t> shape,
           std::optional<dtype> as = std::nullopt) {
    const dtype type = as.value_or(std::is_same_v<T, float> ? dtype::f32 : dtype::f64);
    if (!is_floating(type))
      throw value_error(detail::message("safetensors_writer::add: tensor '", name, "': dtype ",
                                        to_string(type), " is not F16, BF16, F32 or F64"));
    check_utf8("tensor name", name);
    if (name == "__metadata__" || index_.contains(name))
      throw value_error(detail::message("safetensors_writer::add: tensor name '", name, "' is ",
                                        name == "__metadata__" ? "reserved" : "already used"));
    std::uint64_t n = 1;
    for (auto d : shape) {
      auto p = detail::checked_mul(n, d);
      if (!p) throw value_error(detail::message("safetensors_writer::add: tensor '", name,
                                                "': the element count of ", detail::shape_string(shape),
                                                " overflows"));
      n = *p;
    }
    if (n != values.size())
      throw value_error(detail::message("safetensors_writer::add: tensor '", name, "' has ", values.size(),
                                        " values but shape ", detail::shape_string(shape), " needs ", n));
    entry e{std::move(name), type, std::move(shape), {}};
    const std::size_t w = dtype_size(type);
    e.bytes.resize(values.size() * w);
    for (std::size_t i = 0; i < values.size(); ++i) {
      unsigned char* out = e.bytes.data() + i * w;
      detail::encode_element(type, values[i], out);
      const T v = values[i];
      if (!std::isfinite(v)) continue;
      const double back = detail::decode_element<double>(type, out);
      const bool overflow = std::isinf(back), underflow = back == 0.0 && v != T(0);
      if (!overflow && !underflow) continue;
      if (narrowing_ == narrowing::refuse)
        throw value_error(detail::message("safetensors_writer::add: tensor '", e.name, "': value ", v,
                                          " at flat index ", i, " does not fit ", to_string(type), " (it would be ",
                                          overflow ? "infinite" : "zero", "); store a wider dtype or saturate"));
      const double saturated = overflow ? std::copysign(largest_finite(type), static_cast<double>(v)) : 0.0;
      detail::encode_element(type, saturated, out);
      ++saturated_;
    }
    index_.emplace(e.name, entries_.size());
    entries_.push_back(std::move(e));
  }

  /// Sets a `__metadata__` entry. Throws value_error when the key or value is not valid UTF-8.
  void metadata(std::string key, std::string value) {
    check_utf8("metadata key", key);
    check_utf8("metadata value", value);
    metadata_[std::move(key)] = std::move(value);
  }

  bool contains(std::string_view name) const { return index_.contains(std::string(name)); }
  std::size_t size() const noexcept { return entries_.size(); }
  /// What add() does with values the stored dtype cannot hold (default: refuse).
  void set_narrowing(narrowing n) noexcept { narrowing_ = n; }
  /// How many values narrowing::saturate changed so far.
  std::size_t saturated() const noexcept { return saturated_; }

  /// The largest finite value of a floating-point dtype.
  static double largest_finite(dtype t) noexcept {
    switch (t) {
      case dtype::f16: return 65504.0;
      case dtype::bf16: return detail::decode_small_float<8, 7>(0x7F7F);
      case dtype::f32: return static_cast<double>(std::numeric_limits<float>::max());
      default: return std::numeric_limits<double>::max();
    }
  }

  /// The whole file as bytes.
  std::vector<unsigned char> serialize() const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::vector<std::size_t> offsets;
    std::size_t at = 0;
    for (const auto& e : entries_) {
      header[e.name] = {{"dtype", to_string(e.type)}, {"shape", e.shape}, {"data_offsets", {at, at + e.bytes.size()}}};
      offsets.push_back(at);
      at += e.bytes.size();
    }
    std::string text = header.dump();
    while ((8 + text.size()) % 8 != 0) text.push_back(' ');
    std::vector<unsigned char> out(8 + text.size() + at);
    detail::store_le(out.data(), text.size(), 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    for (std::size_t i = 0; i < entries_.size(); ++i)
      if (!entries_[i].bytes.empty())
        std::memcpy(out.data() + 8 + text.size() + offsets[i], entries_[i].bytes.data(), entries_[i].bytes.size());
    return out;
  }

  /// Writes the file at `path` atomically: into a temporary file in the same directory, flushed
  /// to disk, then renamed over `path`. On any failure the temporary is removed, `path` is left
  /// as it was, and io_error names the file.
  void save(const std::filesystem::path& path) const { write_atomically(path, serialize()); }

  /// Writes `bytes` to `path` as save() does.
  static void write_atomically(const std::filesystem::path& path, std::span<const unsigned char> bytes) {
    namespace fs = std::filesystem;
    const std::string where = path.string();
    if (path.filename().empty())
      throw io_error(detail::message("safetensors: cannot save to '", where, "': not a file name"));
    const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
    std::random_device entropy;
    const auto stamp = (static_cast<std::uint64_t>(entropy()) << 32) ^ entropy();
#if SMEAR_IO_POSIX
    fs::path tmp;
    int fd = -1;
    for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
      tmp = dir / (path.filename().string() + ".tmp-" + std::to_string(::getpid()) + "-" +
                   std::to_string(stamp + static_cast<std::uint64_t>(attempt)));
      fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0)
      throw io_error(detail::message("safetensors: cannot save '", where, "': cannot create a temporary file in '",
                                     dir.string(), "': ", std::strerror(errno)));
    auto abandon = [&](const char* what, int err) {
      ::close(fd);
      std::error_code ignore;
      fs::remove(tmp, ignore);
      throw io_error(detail::message("safetensors: cannot save '", where, "': ", what, ": ", std::strerror(err),
                                     " (the file was left as it was)"));
    };
    std::size_t done = 0;
    while (done < bytes.size()) {
      const auto w = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (w < 0) {
        if (errno == EINTR) continue;
        abandon("writing failed", errno);
      }
      done += static_cast<std::size_t>(w);
    }
    if (::fsync(fd) != 0) abandon("flushing to disk failed", errno);
    if (::close(fd) != 0) {
      const int err = errno;
      std::error_code ignore;
      fs::remove(tmp, ignore);
      throw io_error(detail::message("safetensors: cannot save '", where, "': closing failed: ", std::strerror(err),
                                     " (the file was left as it was)"));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      std::error_code ignore;
      fs::remove(tmp, ignore);
      throw io_error(detail::message("safetensors: cannot save '", where, "': renaming the temporary failed: ",
                                     std::strerror(err), " (the file was left as it was)"));
    }
    // make the rename itself durable
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
#else
    const fs::path tmp = dir / (path.filename().string() + ".tmp-" + std::to_string(stamp));
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
      out.flush();
      if (!out) {
        out.close();
        std::error_code ignore;
        fs::remove(tmp, ignore);
        throw io_error(detail::message("safetensors: cannot save '", where, "': writing the temporary failed"
                                       " (the file was left as it was)"));
      }
    }
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) {
      std::error_code ignore;
      fs::remove(tmp, ignore);
      throw io_error(detail::message("safetensors: cannot save '", where, "': renaming the temporary failed: ",
                                     ec.message(), " (the file was left as it was)"));
    }
#endif
  }

 private:
  static void check_utf8(const char* what, const std::string& text) {
    try {
      (void)nlohmann::json(text).dump();
    } catch (const nlohmann::json::exception&) {
      throw value_error(detail::message("safetensors_writer: the ", what, " is not valid UTF-8"));
    }
  }

  struct entry {
    std::string name;
    dtype type;
    std::vector<std::size_t> shape;
    std::vector<unsigned char> bytes;
  };
  narrowing narrowing_ = narrowing::refuse;
  std::size_t saturated_ = 0;
  std::vector<entry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace smear
