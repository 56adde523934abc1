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
/// header length against the file; the header against the format's grammar, in one pass whose
/// time is linear in its size (strict JSON: valid UTF-8, no NUL byte, no unescaped control
/// character, nothing but whitespace after the closing brace; no nesting beyond the format's,
/// no duplicate tensor name, field or metadata key, no unknown field; dimensions and offsets
/// written as plain integers below 2^64); the dtype against the known ones; each shape's
/// element count and byte count for overflow; each byte range against the data and against
/// the tensor's size; and the ranges against each other (no overlap, no gap, the data fully
/// covered — what the reference implementation requires). Any failure is a smear::io_error
/// naming the file and, where one is involved, the tensor or the byte offset.
///
/// This header needs nlohmann/json (Debian: nlohmann-json3-dev) for writing; link the
/// `smear::io` CMake target, which adds it. It is not included by <smear/smear.hpp>.

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <chrono>
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
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#if __has_include(<unistd.h>) && __has_include(<fcntl.h>)
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
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

    header_parser(*this, data_size).run();  // fills tensors_ (in header order), index_, metadata_

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
    std::vector<std::size_t> position(tensors_.size());  // header order -> data order
    for (std::size_t j = 0; j < by_begin.size(); ++j) {
      position[by_begin[j]] = j;
      sorted.push_back(std::move(tensors_[by_begin[j]]));
    }
    tensors_ = std::move(sorted);
    for (auto& entry : index_) entry.second = position[entry.second];
  }

  /// The header's parser: one pass over the text, no document tree, linear in the header's size.
  ///
  /// Why not nlohmann/json: its parse() with a callback (needed to see duplicate names, which
  /// its objects silently merge) copies each finished value into its parent, so the time grew
  /// with the square of the tensor count (20 000 entries: 6 s; 60 000: a minute). Its SAX
  /// interface is linear, but a SAX handler would still have to rebuild by hand everything the
  /// format requires (which field goes where, integers only, no repeated field or key) from a
  /// stream of events that have lost their byte offsets and, for numbers, their spelling
  /// (1.0 and 1 look alike once converted). The safetensors grammar is small enough to parse
  /// directly:
  ///
  ///     header   = '{' [ member *( ',' member ) ] '}' *whitespace
  ///     member   = string ':' ( entry | metadata )      ; metadata only under "__metadata__"
  ///     entry    = '{' field *( ',' field ) '}'           ; each of the three exactly once
  ///     field    = "dtype" ':' string | "shape" ':' '[' [ uint *( ',' uint ) ] ']'
  ///              | "data_offsets" ':' '[' uint ',' uint ']'
  ///     metadata = '{' [ string ':' string *( ',' string ':' string ) ] '}'
  ///     uint     = '0' | [1-9] *digit                     ; below 2^64
  ///
  /// with JSON's whitespace between tokens and JSON's strings: every escape (\uXXXX included,
  /// surrogate pairs joined, lone surrogates refused) decoded to UTF-8, raw bytes checked as
  /// UTF-8, control characters below 0x20 refused unless escaped. A NUL byte anywhere in the
  /// header is refused before parsing. A value of the wrong kind is first read through as JSON
  /// (at most three levels deep, the header's own nesting) so that broken JSON is reported as
  /// such; then its kind is refused. Errors give the byte offset counted from the start of the
  /// file. After the closing brace only JSON whitespace may follow: writers pad the header with
  /// spaces, and the reference reader (serde_json) accepts any JSON whitespace there.
  class header_parser {
   public:
    header_parser(safetensors_file& file, std::size_t data_size) noexcept
        : file_(file),
          first_(file.bytes_.data() + 8),
          p_(first_),
          last_(file.bytes_.data() + file.data_),
          data_size_(data_size) {}

    void run() {
      if (const void* nul = std::memchr(first_, 0, static_cast<std::size_t>(last_ - first_)))
        file_.fail(detail::message("the header holds a NUL byte at byte ",
                                   offset(static_cast<const unsigned char*>(nul)), " (JSON text cannot)"));
      expect('{', "'{'");
      members("a tensor name (a string)", "an entry", [&](std::string name, const unsigned char* at) {
        if (name == "__metadata__")
          metadata(at);
        else
          entry(std::move(name), at);
      });
      skip_ws();
      if (p_ != last_)
        syntax("unexpected " + describe(*p_) + " after the header's closing '}' (only whitespace may follow it)");
    }

   private:
    static constexpr int max_depth = 3;  // the header, an entry, a shape

    static bool is_ws(unsigned char c) noexcept { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
    void skip_ws() noexcept {
      while (p_ < last_ && is_ws(*p_)) ++p_;
    }
    int peek() const noexcept { return p_ < last_ ? *p_ : -1; }
    std::size_t offset(const unsigned char* p) const noexcept { return 8 + static_cast<std::size_t>(p - first_); }

    static std::string describe(unsigned char c) {
      if (c >= 0x20 && c < 0x7F) return detail::message("'", static_cast<char>(c), "'");
      constexpr char hex[] = "0123456789abcdef";
      return std::string("byte 0x") + hex[c >> 4] + hex[c & 15];
    }

    [[noreturn]] void syntax_at(const unsigned char* p, const std::string& what) const {
      file_.fail(detail::message("the header is not valid JSON at byte ", offset(p), ": ", what));
    }
    [[noreturn]] void syntax(const std::string& what) const { syntax_at(p_, what); }

    void expect(char c, const char* what) {
      if (p_ == last_ || *p_ != static_cast<unsigned char>(c)) unexpected(what);
      ++p_;
    }
    [[noreturn]] void unexpected(const std::string& what) const {
      if (p_ == last_) syntax("the header ends where " + what + " was expected");
      syntax("expected " + what + ", found " + describe(*p_));
    }
    void colon() {
      skip_ws();
      expect(':', "':' after a name");
      skip_ws();
    }
    /// After a member of an object: true after ',' (another follows), false after `close`.
    bool next_member(const char* what, char close) {
      skip_ws();
      if (peek() == ',') {
        ++p_;
        return true;
      }
      if (peek() != close) unexpected(detail::message("',' or '", close, "' after ", what));
      ++p_;
      return false;
    }
    /// The members of an object whose '{' was just read: `member(name, name_at)` reads each
    /// value (p_ is past the ':'). `name_what` and `member_what` name them in errors.
    template <class F>
    void members(const char* name_what, const char* member_what, F&& member) {
      skip_ws();
      if (peek() == '}') {
        ++p_;
        return;
      }
      do {
        skip_ws();
        const unsigned char* name_at = p_;
        expect('"', name_what);
        std::string name = string_body();
        colon();
        member(std::move(name), name_at);
      } while (next_member(member_what, '}'));
    }
    /// The elements of an array whose '[' was just read: `element()` reads each.
    template <class F>
    void elements(F&& element) {
      skip_ws();
      if (peek() == ']') {
        ++p_;
        return;
      }
      do {
        skip_ws();
        element();
      } while (next_member("an element", ']'));
    }

    /// A string's contents, decoded; p_ is just past the opening quote and ends past the closing one.
    std::string string_body() {
      std::string out;
      const unsigned char* open = p_ - 1;
      for (;;) {
        const unsigned char* run = p_;
        while (p_ < last_ && *p_ >= 0x20 && *p_ < 0x80 && *p_ != '"' && *p_ != '\\') ++p_;
        out.append(reinterpret_cast<const char*>(run), static_cast<std::size_t>(p_ - run));
        if (p_ == last_) syntax_at(open, "the string starting here is not terminated");
        const unsigned char c = *p_;
        if (c == '"') {
          ++p_;
          return out;
        }
        if (c == '\\')
          escape(out);
        else if (c < 0x20)
          syntax("control character " + describe(c) + " in a string (JSON needs it escaped)");
        else
          utf8_sequence(out);
      }
    }

    void escape(std::string& out) {
      const unsigned char* at = p_;  // the backslash
      if (last_ - p_ < 2) syntax_at(at, "the string ends inside an escape");
      const unsigned char c = p_[1];
      p_ += 2;
      switch (c) {
        case '"': out += '"'; return;
        case '\\': out += '\\'; return;
        case '/': out += '/'; return;
        case 'b': out += '\b'; return;
        case 'f': out += '\f'; return;
        case 'n': out += '\n'; return;
        case 'r': out += '\r'; return;
        case 't': out += '\t'; return;
        case 'u': break;
        default: syntax_at(at, "invalid escape '\\" + std::string(1, static_cast<char>(c)) + "'"); 
      }
      std::uint32_t cp = hex4(at);
      if (cp >= 0xDC00 && cp <= 0xDFFF) syntax_at(at, "\\u escape of a low surrogate without a high one before it");
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (last_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u')
          syntax_at(at, "\\u escape of a high surrogate not followed by the \\u escape of a low one");
        p_ += 2;
        const std::uint32_t low = hex4(at);
        if (low < 0xDC00 || low > 0xDFFF)
          syntax_at(at, "\\u escape of a high surrogate not followed by the \\u escape of a low one");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
      }
      append_utf8(out, cp);
    }

    std::uint32_t hex4(const unsigned char* at) {
      if (last_ - p_ < 4) syntax_at(at, "\\u needs four hex digits");
      std::uint32_t v = 0;
      for (int i = 0; i < 4; ++i, ++p_) {
        const unsigned char c = *p_;
        std::uint32_t d;
        if (c >= '0' && c <= '9')
          d = static_cast<std::uint32_t>(c - '0');
        else if (c >= 'a' && c <= 'f')
          d = static_cast<std::uint32_t>(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
          d = static_cast<std::uint32_t>(c - 'A' + 10);
        else
          syntax_at(at, "\\u needs four hex digits, found " + describe(c));
        v = v << 4 | d;
      }
      return v;
    }

    static void append_utf8(std::string& out, std::uint32_t cp) {
      auto put = [&](std::uint32_t b) { out += static_cast<char>(static_cast<unsigned char>(b)); };
      if (cp < 0x80) {
        put(cp);
      } else if (cp < 0x800) {
        put(0xC0 | cp >> 6);
        put(0x80 | (cp & 0x3F));
      } else if (cp < 0x10000) {
        put(0xE0 | cp >> 12);
        put(0x80 | (cp >> 6 & 0x3F));
        put(0x80 | (cp & 0x3F));
      } else {
        put(0xF0 | cp >> 18);
        put(0x80 | (cp >> 12 & 0x3F));
        put(0x80 | (cp >> 6 & 0x3F));
        put(0x80 | (cp & 0x3F));
      }
    }

    /// One UTF-8 sequence of 2 to 4 bytes, checked (no overlong forms, no surrogates, nothing
    /// above U+10FFFF: RFC 3629's table) and copied.
    void utf8_sequence(std::string& out) {
      const unsigned char c = *p_;
      std::size_t more = 0;
      unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
      if (c >= 0xC2 && c <= 0xDF) {
        more = 1;
      } else if (c == 0xE0) {
        more = 2;
        lo = 0xA0;
      } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
        more = 2;
      } else if (c == 0xED) {
        more = 2;
        hi = 0x9F;
      } else if (c == 0xF0) {
        more = 3;
        lo = 0x90;
      } else if (c >= 0xF1 && c <= 0xF3) {
        more = 3;
      } else if (c == 0xF4) {
        more = 3;
        hi = 0x8F;
      } else {
        syntax("invalid UTF-8 (" + describe(c) + " cannot start a character)");
      }
      if (static_cast<std::size_t>(last_ - p_) <= more) syntax("invalid UTF-8 (a character cut short)");
      for (std::size_t i = 1; i <= more; ++i) {
        const unsigned char b = p_[i];
        if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF))
          syntax("invalid UTF-8 (" + describe(c) + " followed by " + describe(b) + ")");
      }
      out.append(reinterpret_cast<const char*>(p_), more + 1);
      p_ += more + 1;
    }

    /// A value of the wrong kind, read through as JSON; `depth` is its depth if it is an object
    /// or array.
    void skip_value(int depth) {
      skip_ws();
      const int c = peek();
      if (c == '{' || c == '[') {
        if (depth > max_depth)
          file_.fail(detail::message("the header nests deeper than a safetensors header does (byte ", offset(p_),
                                     ")"));
        ++p_;
        if (c == '{')
          members("a name (a string)", "a member", [&](std::string, const unsigned char*) { skip_value(depth + 1); });
        else
          elements([&] { skip_value(depth + 1); });
        return;
      }
      if (c == '"') {
        ++p_;
        (void)string_body();
        return;
      }
      for (const std::string_view word : {std::string_view("true"), std::string_view("false"), std::string_view("null")}) {
        if (c == word[0]) {
          if (static_cast<std::size_t>(last_ - p_) < word.size() ||
              std::memcmp(p_, word.data(), word.size()) != 0)
            syntax("expected a value, found " + describe(*p_));
          p_ += word.size();
          return;
        }
      }
      if (c == '-' || (c >= '0' && c <= '9')) {
        json_number();
        return;
      }
      if (c < 0) syntax("the header ends where a value was expected");
      syntax("expected a value, found " + describe(*p_));
    }

    /// A JSON number (RFC 8259 section 6), skipped.
    void json_number() {
      auto digits = [&] {
        const unsigned char* start = p_;
        while (p_ < last_ && *p_ >= '0' && *p_ <= '9') ++p_;
        if (p_ == start) syntax(p_ == last_ ? "the header ends inside a number" : "expected a digit, found " + describe(*p_));
      };
      if (peek() == '-') ++p_;
      if (peek() == '0')
        ++p_;
      else
        digits();
      if (peek() == '.') {
        ++p_;
        digits();
      }
      if (peek() == 'e' || peek() == 'E') {
        ++p_;
        if (peek() == '+' || peek() == '-') ++p_;
        digits();
      }
    }

    /// An unsigned integer as the format writes them: digits only, no sign, fraction, exponent
    /// or leading zero, below 2^64. `what` is the complaint, for `tensor`.
    std::uint64_t read_uint(const std::string& tensor, const char* what) {
      const unsigned char* at = p_;
      auto number_char = [](unsigned char c) {
        return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
      };
      while (p_ < last_ && number_char(*p_)) ++p_;
      const std::string_view token(reinterpret_cast<const char*>(at), static_cast<std::size_t>(p_ - at));
      auto bad = [&](const char* why) {
        const std::string shown = token.size() > 40 ? std::string(token.substr(0, 40)) + "..." : std::string(token);
        file_.fail(detail::message("tensor '", tensor, "': ", what, " (", shown.empty() ? "a value" : shown,
                                   " at byte ", offset(at), ": ", why, ")"));
      };
      if (token.empty()) {
        skip_value(max_depth + 1);
        bad("not a number");
      }
      if (token.find_first_not_of("0123456789") != std::string_view::npos) bad("a sign, a fraction or an exponent");
      if (token.size() > 1 && token[0] == '0') bad("a leading zero");
      std::uint64_t v = 0;
      for (const char ch : token) {
        const auto d = static_cast<std::uint64_t>(ch - '0');
        if (v > (std::numeric_limits<std::uint64_t>::max() - d) / 10) bad("more than 64 bits");
        v = v * 10 + d;
      }
      return v;
    }

    void entry(std::string name, const unsigned char* at) {
      if (!file_.index_.emplace(name, file_.tensors_.size()).second)
        file_.fail(detail::message("duplicate tensor name '", name, "' (the second at byte ", offset(at), ")"));
      auto bad = [&](const std::string& what) { file_.fail(detail::message("tensor '", name, "': ", what)); };
      if (peek() != '{') {
        skip_value(2);
        bad("the entry is not an object with dtype, shape and data_offsets");
      }
      ++p_;
      std::optional<dtype> type;
      bool has_shape = false, has_offsets = false;
      std::vector<std::uint64_t> dims;
      std::size_t offsets = 0;  // how many of data_offsets were read
      std::array<std::uint64_t, 2> range{};
      const char* const bad_dim = "shape holds something other than a non-negative integer below 2^64";
      const char* const bad_range = "data_offsets is not [begin, end] with non-negative integers below 2^64";
      members("a field name (a string)", "a field", [&](const std::string& field, const unsigned char* field_at) {
        auto once = [&](bool seen) {
          if (seen)
            bad(detail::message("the field '", field, "' appears twice (the second at byte ", offset(field_at), ")"));
        };
        if (field == "dtype") {
          once(type.has_value());
          if (peek() != '"') {
            skip_value(3);
            bad("dtype is not a string");
          }
          ++p_;
          const std::string text = string_body();
          type = parse_dtype(text);
          if (!type) bad(detail::message("unknown dtype '", text, "'"));
        } else if (field == "shape") {
          once(has_shape);
          has_shape = true;
          if (peek() != '[') {
            skip_value(3);
            bad("shape is not an array");
          }
          ++p_;
          elements([&] { dims.push_back(read_uint(name, bad_dim)); });
        } else if (field == "data_offsets") {
          once(has_offsets);
          has_offsets = true;
          if (peek() != '[') {
            skip_value(3);
            bad(bad_range);
          }
          const unsigned char* array_at = p_++;
          elements([&] {
            if (offsets == 2) bad(detail::message(bad_range, " (more than two numbers at byte ", offset(array_at), ")"));
            range[offsets++] = read_uint(name, bad_range);
          });
          if (offsets != 2)
            bad(detail::message(bad_range, " (", offsets, offsets == 1 ? " number" : " numbers", " at byte ",
                                offset(array_at), ")"));
        } else {
          bad(detail::message("unknown field '", field, "'"));
        }
      });
      if (!type || !has_shape || offsets != 2) bad("the entry needs dtype, shape and data_offsets");
      tensor_info t;
      t.type = *type;
      std::uint64_t count = 1;
      for (const auto d : dims) {
        const auto product = detail::checked_mul(count, d);
        if (!product || d > std::numeric_limits<std::size_t>::max())
          bad(detail::message("the shape's element count overflows (", d, " after ", count, ")"));
        count = *product;
        t.shape.push_back(static_cast<std::size_t>(d));
      }
      const auto bytes = detail::checked_mul(count, dtype_size(t.type));
      if (!bytes) bad(detail::message("the byte count of shape ", detail::shape_string(t.shape), " overflows"));
      const auto [begin, end] = range;
      if (begin > end || end > data_size_)
        bad(detail::message("data_offsets [", begin, ", ", end, ") lie outside the data (", data_size_, " bytes)"));
      if (end - begin != *bytes)
        bad(detail::message("data_offsets [", begin, ", ", end, ") hold ", end - begin, " bytes, but ",
                            to_string(t.type), " ", detail::shape_string(t.shape), " needs ", *bytes));
      t.begin = static_cast<std::size_t>(begin);
      t.end = static_cast<std::size_t>(end);
      t.name = std::move(name);
      file_.tensors_.push_back(std::move(t));
    }

    void metadata(const unsigned char* at) {
      if (seen_metadata_) file_.fail(detail::message("__metadata__ appears twice (the second at byte ", offset(at), ")"));
      seen_metadata_ = true;
      if (peek() != '{') {
        skip_value(2);
        file_.fail("__metadata__ is not an object of strings");
      }
      ++p_;
      members("a metadata key (a string)", "a metadata entry", [&](std::string key, const unsigned char* key_at) {
        if (peek() != '"') {
          skip_value(3);
          file_.fail(detail::message("__metadata__ entry '", key, "' is not a string"));
        }
        ++p_;
        std::string value = string_body();
        if (!file_.metadata_.emplace(key, std::move(value)).second)
          file_.fail(detail::message("duplicate __metadata__ key '", key, "' (the second at byte ", offset(key_at), ")"));
      });
    }

    safetensors_file& file_;
    const unsigned char* first_;  // the header's first byte ('{')
    const unsigned char* p_;      // the next byte to read
    const unsigned char* last_;   // one past the header's last byte
    std::size_t data_size_;
    bool seen_metadata_ = false;
  };

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
    // The header's text is assembled here, each string escaped by nlohmann/json: the same bytes
    // as dumping an nlohmann::ordered_json, whose every insertion searches the keys one by one
    // (quadratic in the tensor count: 40 000 tensors took 3 s).
    auto quoted = [](const std::string& s) { return nlohmann::json(s).dump(); };
    std::string text = "{";
    if (!metadata_.empty()) {
      text += "\"__metadata__\":{";
      for (const auto& [key, value] : metadata_) {
        if (text.back() != '{') text += ',';
        text += quoted(key) + ":" + quoted(value);
      }
      text += '}';
    }
    std::vector<std::size_t> offsets;
    offsets.reserve(entries_.size());
    std::size_t at = 0;
    for (const auto& e : entries_) {
      if (text.size() > 1) text += ',';
      text += quoted(e.name) + ":{\"dtype\":\"" + std::string(to_string(e.type)) + "\",\"shape\":[";
      for (std::size_t i = 0; i < e.shape.size(); ++i) text += (i ? "," : "") + std::to_string(e.shape[i]);
      text += "],\"data_offsets\":[" + std::to_string(at) + "," + std::to_string(at + e.bytes.size()) + "]}";
      offsets.push_back(at);
      at += e.bytes.size();
    }
    text += '}';
    while ((8 + text.size()) % 8 != 0) text.push_back(' ');
    std::vector<unsigned char> out(8 + text.size() + at);
    detail::store_le(out.data(), text.size(), 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    for (std::size_t i = 0; i < entries_.size(); ++i)
      if (!entries_[i].bytes.empty())
        std::memcpy(out.data() + 8 + text.size() + offsets[i], entries_[i].bytes.data(), entries_[i].bytes.size());
    return out;
  }

  /// Writes the file at `path` atomically: into a temporary file in the directory of the file
  /// to replace, flushed to disk, then renamed over it (and the directory flushed). On any
  /// failure the temporary is removed, the old file is left as it was, and io_error names the
  /// file. In detail:
  ///
  /// - Symbolic links are followed: when `path` is a symbolic link (or a chain of them), the
  ///   file it finally points to is replaced, so the link stays a link and shows the new
  ///   content; a dangling link gets its target created.
  /// - Overwriting keeps the old file's permission bits (a checkpoint made 0600 stays 0600); a
  ///   new file gets 0666 & ~umask. As with any save by rename, the new file belongs to the
  ///   saver, and other hard links to the old file keep the old content.
  /// - The temporary is named `.smear-<pid>-<16 hex digits>.tmp` (at most 38 characters, so a
  ///   file name of up to NAME_MAX characters can be saved). Each successful save also removes
  ///   the temporaries that killed saves left in that directory: files so named whose process
  ///   no longer exists (kill(pid, 0) fails with ESRCH) and that have not been modified for an
  ///   hour. The hour leaves alone a save running on another machine or in another PID
  ///   namespace that shares the directory, whose pid means nothing here: a live save keeps
  ///   writing its temporary and renames it as soon as it is flushed.
  void save(const std::filesystem::path& path) const { write_atomically(path, serialize()); }

  /// Writes `bytes` to `path` as save() does.
  static void write_atomically(const std::filesystem::path& path, std::span<const unsigned char> bytes) {
    namespace fs = std::filesystem;
    const std::string where = path.string();
    if (path.filename().empty())
      throw io_error(detail::message("safetensors: cannot save to '", where, "': not a file name"));
    const fs::path target = resolve_links(path, where);
    const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
    std::random_device entropy;
    const auto stamp = (static_cast<std::uint64_t>(entropy()) << 32) ^ entropy();
#if SMEAR_IO_POSIX
    struct stat old {};
    const bool replacing = ::stat(target.c_str(), &old) == 0 && S_ISREG(old.st_mode);
    const auto mode = static_cast<mode_t>(replacing ? (old.st_mode & 0777) : 0666);
    fs::path tmp;
    int fd = -1;
    for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
      tmp = dir / temporary_name(::getpid(), stamp + static_cast<std::uint64_t>(attempt));
      fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
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
    // the umask applied at open; restore the old file's bits exactly, before any byte is written
    if (replacing && ::fchmod(fd, mode) != 0) abandon("setting the permissions of the temporary failed", errno);
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
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
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
    remove_orphaned_temporaries(dir);
#else
    std::error_code had;
    const auto old = fs::status(target, had);
    const bool replacing = !had && fs::is_regular_file(old);
    const fs::path tmp = dir / temporary_name(0, stamp);
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
    if (replacing) fs::permissions(tmp, old.permissions(), fs::perm_options::replace, ec);
    if (!ec) fs::rename(tmp, target, ec);
    if (ec) {
      std::error_code ignore;
      fs::remove(tmp, ignore);
      throw io_error(detail::message("safetensors: cannot save '", where, "': renaming the temporary failed: ",
                                     ec.message(), " (the file was left as it was)"));
    }
#endif
  }

 private:
  /// The name of a save's temporary: `.smear-<pid>-<stamp as 16 hex digits>.tmp`.
  static std::string temporary_name(long pid, std::uint64_t stamp) {
    constexpr char hex[] = "0123456789abcdef";
    std::string digits(16, '0');
    for (std::size_t i = 0; i < 16; ++i) digits[15 - i] = hex[(stamp >> (4 * i)) & 15];
    return ".smear-" + std::to_string(pid) + "-" + digits + ".tmp";
  }

  /// The pid in a name made by temporary_name, or nothing for any other name.
  static std::optional<long> temporary_pid(std::string_view name) noexcept {
    constexpr std::string_view head = ".smear-", tail = ".tmp";
    constexpr std::size_t stamp = 17;  // '-' and 16 hex digits
    if (name.size() < head.size() + 1 + stamp + tail.size() || !name.starts_with(head) || !name.ends_with(tail))
      return std::nullopt;
    const auto middle = name.substr(head.size(), name.size() - head.size() - tail.size());
    const auto pid = middle.substr(0, middle.size() - stamp), hex = middle.substr(middle.size() - stamp);
    if (pid.size() > 10 || pid[0] == '0' || hex[0] != '-' ||
        hex.find_first_not_of("0123456789abcdef", 1) != std::string_view::npos)
      return std::nullopt;
    long v = 0;
    for (const char c : pid) {
      if (c < '0' || c > '9') return std::nullopt;
      v = v * 10 + (c - '0');
    }
    if (v > std::numeric_limits<int>::max()) return std::nullopt;
    return v;
  }

  /// `path` with its symbolic links followed to the file they finally name (the directories on
  /// the way are left as they are: renaming within them works through links).
  static std::filesystem::path resolve_links(const std::filesystem::path& path, const std::string& where) {
    namespace fs = std::filesystem;
    fs::path target = path;
    for (int links = 0;; ++links) {
      std::error_code ec;
      if (fs::symlink_status(target, ec).type() != fs::file_type::symlink) return target;
      if (links == 40)
        throw io_error(detail::message("safetensors: cannot save '", where, "': more than 40 symbolic links"));
      fs::path next = fs::read_symlink(target, ec);
      if (ec)
        throw io_error(detail::message("safetensors: cannot save '", where, "': cannot read the symbolic link '",
                                       target.string(), "': ", ec.message()));
      target = next.is_absolute() ? std::move(next) : target.parent_path() / next;
    }
  }

#if SMEAR_IO_POSIX
  /// Removes the temporaries of killed saves in `dir` (see save()); never fails.
  static void remove_orphaned_temporaries(const std::filesystem::path& dir) noexcept {
    namespace fs = std::filesystem;
    try {
      const auto me = static_cast<long>(::getpid());
      const auto now = fs::file_time_type::clock::now();
      std::error_code ec;
      for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const auto pid = temporary_pid(it->path().filename().native());
        if (!pid || *pid == me) continue;
        std::error_code e;
        if (it->symlink_status(e).type() != fs::file_type::regular) continue;
        const auto modified = fs::last_write_time(it->path(), e);
        if (e || now - modified < std::chrono::hours(1)) continue;
        if (::kill(static_cast<pid_t>(*pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
        fs::remove(it->path(), e);
      }
    } catch (...) {  // out of memory while listing: the orphans stay until the next save
    }
  }
#endif

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
