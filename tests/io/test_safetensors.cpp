// The safetensors reader and writer: dtype conversions against independent computations,
// bit-exact round trips for every dtype, a file written byte by byte from the format's
// description, hostile files (each must give an io_error naming the file, never a crash) and
// atomic saving.

#include <doctest/doctest.h>

#include <smear/io/safetensors.hpp>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "smear/random.hpp"

#include <sys/stat.h>
#include <unistd.h>

using namespace smear;
namespace fs = std::filesystem;

namespace {

using bytes_t = std::vector<unsigned char>;

/// A file made by hand: the 8-byte length, the header text as given, then `data`.
bytes_t make_file(const std::string& header, const bytes_t& data = {}) {
  bytes_t out(8 + header.size() + data.size());
  detail::store_le(out.data(), header.size(), 8);
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return out;
}

double half_value(std::uint16_t b) { return detail::decode_small_float<5, 10>(b); }
double bf16_value(std::uint16_t b) { return detail::decode_small_float<8, 7>(b); }

/// The bits of the nearest bfloat16 to a float by the usual integer trick (ties to even).
std::uint16_t bf16_by_bits(float f) {
  const auto u = std::bit_cast<std::uint32_t>(f);
  return static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

fs::path scratch(const std::string& name) {
  fs::path dir = fs::path(SMEAR_IO_TEST_DIR) / "safetensors";
  fs::create_directories(dir);
  return dir / name;
}

/// How many save temporaries (.smear-<pid>-<hex>.tmp) lie in `dir`.
std::size_t leftovers(const fs::path& dir) {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto name = e.path().filename().string();
    if (name.starts_with(".smear-") && name.ends_with(".tmp")) ++n;
  }
  return n;
}

/// A fresh empty directory under the scratch directory.
fs::path fresh_dir(const std::string& name) {
  const auto dir = scratch(name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream o(path, std::ios::binary);
  o << text;
}

std::vector<double> saved_values(const fs::path& path) { return safetensors_file::open(path).read<double>("v"); }

void save_values(const fs::path& path, const std::vector<double>& v) {
  safetensors_writer out;
  out.add("v", std::span<const double>(v), {v.size()});
  out.save(path);
}

fs::perms permissions(const fs::path& path) { return fs::status(path).permissions() & fs::perms::mask; }

}  // namespace

TEST_CASE("dtype names and sizes follow the format") {
  CHECK(to_string(dtype::bf16) == "BF16");
  CHECK(parse_dtype("F64") == dtype::f64);
  CHECK(parse_dtype("F8_E4M3") == dtype::f8_e4m3);
  CHECK_FALSE(parse_dtype("f32").has_value());
  CHECK_FALSE(parse_dtype("F17").has_value());
  CHECK_FALSE(parse_dtype("F4").has_value());  // sub-byte types are not supported
  CHECK(parse_dtype("C64") == dtype::c64);
  CHECK(dtype_size(dtype::c64) == 8);
  CHECK(dtype_size(dtype::f8_e8m0) == 1);
  CHECK(dtype_size(dtype::f16) == 2);
  CHECK(dtype_size(dtype::i64) == 8);
  CHECK(dtype_size(dtype::boolean) == 1);
}

TEST_CASE("float16 and bfloat16 decode to the IEEE values") {
  CHECK(half_value(0x3C00) == 1.0);
  CHECK(half_value(0xC000) == -2.0);
  CHECK(half_value(0x7BFF) == 65504.0);
  CHECK(half_value(0x0001) == std::ldexp(1.0, -24));
  CHECK(half_value(0x0400) == std::ldexp(1.0, -14));
  CHECK(half_value(0x3555) == 0x155 * std::ldexp(1.0, -10 - 2) + 0.25);  // nearest to 1/3
  CHECK(std::isinf(half_value(0xFC00)));
  CHECK(half_value(0xFC00) < 0);
  CHECK(std::isnan(half_value(0x7E00)));
  CHECK(std::signbit(half_value(0x8000)));
  CHECK(bf16_value(0x3F80) == 1.0);
  CHECK(bf16_value(0x4049) == 3.140625);
  CHECK(bf16_value(0x0001) == std::ldexp(1.0, -133));
  CHECK(bf16_value(0x7F7F) == std::bit_cast<float>(0x7F7F0000u));
  // bfloat16 is the top half of a float32
  for (std::uint32_t b = 0; b < 0x10000; b += 7) {
    const float f = std::bit_cast<float>(b << 16);
    if (!std::isnan(f)) CHECK(bf16_value(static_cast<std::uint16_t>(b)) == static_cast<double>(f));
  }
}

TEST_CASE("every float16 and bfloat16 bit pattern survives decode then encode") {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const double h = half_value(bits), g = bf16_value(bits);
    if (std::isnan(h))
      CHECK(std::isnan(half_value(detail::encode_small_float<5, 10>(h))));
    else if (detail::encode_small_float<5, 10>(h) != bits)
      FAIL("float16 ", b, " does not round-trip");
    if (std::isnan(g))
      CHECK(std::isnan(bf16_value(detail::encode_small_float<8, 7>(g))));
    else if (detail::encode_small_float<8, 7>(g) != bits)
      FAIL("bfloat16 ", b, " does not round-trip");
  }
}

TEST_CASE("encoding rounds to the nearest value, ties to even") {
  // bfloat16 against the integer trick, over random and boundary floats
  rng gen{7};
  for (int i = 0; i < 200000; ++i) {
    const auto u = static_cast<std::uint32_t>(gen.uniform() * 4294967296.0);
    const float f = std::bit_cast<float>(u);
    if (std::isnan(f)) continue;
    REQUIRE(detail::encode_small_float<8, 7>(f) == bf16_by_bits(f));
  }
  // float16: the result is never farther from v than its neighbours, and ties go to even
  for (int i = 0; i < 200000; ++i) {
    const double v = (gen.uniform() * 2 - 1) * std::ldexp(1.0, static_cast<int>(gen.uniform() * 40) - 26);
    const std::uint16_t b = detail::encode_small_float<5, 10>(v);
    const double got = half_value(b);
    if (std::isinf(got)) {
      REQUIRE(std::fabs(v) >= 65520.0);
      continue;
    }
    const double err = std::fabs(got - v);
    for (int step : {-1, 1}) {
      const auto n = static_cast<std::uint16_t>(b + step);
      if ((n & 0x7FFF) > 0x7BFF || ((b & 0x7FFF) == 0 && step < 0)) continue;
      const double other = std::fabs(half_value(n) - v);
      REQUIRE(err <= other);
      if (err == other) REQUIRE((b & 1) == 0);
    }
  }
  CHECK(detail::encode_small_float<5, 10>(65519.0) == 0x7BFF);
  CHECK(detail::encode_small_float<5, 10>(65520.0) == 0x7C00);             // overflows to +inf
  CHECK(detail::encode_small_float<5, 10>(1.0 + std::ldexp(1.0, -11)) == 0x3C00);  // tie: even
  CHECK(detail::encode_small_float<5, 10>(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3C02);
  CHECK(detail::encode_small_float<5, 10>(std::ldexp(1.0, -25)) == 0x0000);  // tie to zero
  CHECK(detail::encode_small_float<5, 10>(std::ldexp(1.5, -25)) == 0x0001);
  CHECK(detail::encode_small_float<5, 10>(-0.0) == 0x8000);
  CHECK(detail::encode_small_float<5, 10>(1e300) == 0x7C00);
}

TEST_CASE_TEMPLATE("save, load, identical bits, for every dtype", T, float, double) {
  rng gen{11};
  for (dtype type : {dtype::f16, dtype::bf16, dtype::f32, dtype::f64}) {
    CAPTURE(to_string(type));
    // values the dtype holds exactly: decode random bit patterns, NaN/inf and signed zero included
    std::vector<T> values(3 * 5);
    for (std::size_t i = 0; i < values.size(); ++i) {
      const auto u = static_cast<std::uint64_t>(gen.uniform() * 18446744073709551616.0);
      double v;
      switch (type) {
        case dtype::f16: v = half_value(static_cast<std::uint16_t>(u)); break;
        case dtype::bf16: v = bf16_value(static_cast<std::uint16_t>(u)); break;
        case dtype::f32: v = std::bit_cast<float>(static_cast<std::uint32_t>(u)); break;
        default: v = std::bit_cast<double>(u); break;
      }
      if (std::is_same_v<T, float> && type == dtype::f64) v = static_cast<float>(v);  // fits in T
      if (std::isnan(v)) v = static_cast<double>(i);
      values[i] = static_cast<T>(v);
    }
    values[0] = T(-0.0);
    values[1] = std::numeric_limits<T>::infinity();
    safetensors_writer out;
    out.metadata("format", "pt");
    out.add("a.b", std::span<const T>(values), {3, 5}, type);
    out.add("scalar", std::span<const T>(values).first(1), {}, type);
    out.add("empty", std::span<const T>(), {0, 4}, type);
    const auto bytes = out.serialize();
    CHECK(detail::load_le(bytes.data(), 8) % 8 == 0);  // data aligned to 8 bytes
    auto file = safetensors_file::parse(bytes);
    REQUIRE(file.tensors().size() == 3);
    CHECK(file.metadata().at("format") == "pt");
    const auto& t = file.at("a.b");
    CHECK(t.type == type);
    CHECK(t.shape == std::vector<std::size_t>{3, 5});
    const auto back = file.read<T>("a.b");
    REQUIRE(back.size() == values.size());
    CHECK(std::memcmp(back.data(), values.data(), values.size() * sizeof(T)) == 0);
    CHECK(file.read<T>("scalar").size() == 1);
    CHECK(file.at("scalar").shape.empty());
    CHECK(file.read<T>("empty").empty());
    // re-saving what was loaded gives the same file
    safetensors_writer again;
    again.metadata("format", "pt");
    again.add("a.b", std::span<const T>(back), {3, 5}, type);
    again.add("scalar", std::span<const T>(file.read<T>("scalar")), {}, type);
    again.add("empty", std::span<const T>(), {0, 4}, type);
    CHECK(again.serialize() == bytes);
  }
}

TEST_CASE("a file written byte by byte from the format description reads back") {
  // two tensors: F32 [2] = {1.5, -2}, then BF16 [1, 1] = {1.0}; header padded with spaces and
  // tensors listed out of data order, as other writers may do
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[1,1],"data_offsets":[8,10]},)"
      R"("v":{"shape":[2],"dtype":"F32","data_offsets":[0,8]}}    )";
  const bytes_t data{0x00, 0x00, 0xC0, 0x3F,   // 1.5f little-endian
                     0x00, 0x00, 0x00, 0xC0,   // -2.0f
                     0x80, 0x3F};              // bf16 1.0
  const auto file = safetensors_file::parse(make_file(header, data), "hand.safetensors");
  REQUIRE(file.tensors().size() == 2);
  CHECK(file.tensors()[0].name == "v");  // in data order
  CHECK(file.read<float>("v") == std::vector<float>{1.5f, -2.0f});
  CHECK(file.read<double>("w") == std::vector<double>{1.0});
  CHECK(file.raw("w").size() == 2);
  CHECK(file.metadata().at("format") == "pt");
  // a file with only metadata and no tensors is valid
  CHECK(safetensors_file::parse(make_file(R"({"__metadata__":{}})")).tensors().empty());
  CHECK(safetensors_file::parse(make_file("{}")).tensors().empty());
}

TEST_CASE("non-float dtypes open but are not read as floats") {
  const auto file = safetensors_file::parse(
      make_file(R"({"i":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", {1, 0, 0, 0}), "ints.safetensors");
  CHECK(file.at("i").type == dtype::i32);
  CHECK_THROWS_WITH_AS(file.read<float>("i"), doctest::Contains("tensor 'i' has dtype I32"), io_error);
  CHECK_THROWS_WITH_AS(file.read<float>("j"), doctest::Contains("has no tensor 'j'"), io_error);
}

TEST_CASE("hostile files give an io_error naming the file, never a crash") {
  const std::string f32 = R"("dtype":"F32")";
  struct hostile {
    const char* what;
    bytes_t bytes;
    const char* message;  // part of the expected message
  };
  auto header_only = [](std::uint64_t n, std::size_t extra) {
    bytes_t b(8 + extra, ' ');
    detail::store_le(b.data(), n, 8);
    return b;
  };
  std::string deep(100000, '[');
  const std::vector<hostile> cases{
      {"empty file", {}, "truncated"},
      {"7 bytes", bytes_t(7, 0), "truncated"},
      {"header length beyond the file", header_only(100, 10), "runs past the end"},
      {"header length 2^64 - 1", header_only(~std::uint64_t{0}, 4), "runs past the end"},
      {"header not JSON", make_file("{not json"), "not valid JSON"},
      {"header an array", make_file("[1, 2]"), "must start with '{'"},
      {"header JSON but then garbage", make_file("{} x"), "not valid JSON"},
      {"deep nesting", make_file("{\"a\":" + deep), "nests deeper"},
      {"unknown dtype", make_file(R"({"t":{"dtype":"F17","shape":[],"data_offsets":[0,0]}})"), "unknown dtype 'F17'"},
      {"dtype not a string", make_file(R"({"t":{"dtype":3,"shape":[],"data_offsets":[0,0]}})"), "dtype is not a string"},
      {"duplicate names",
       make_file(R"({"t":{)" + f32 + R"(,"shape":[1],"data_offsets":[0,4]},"t":{)" + f32 +
                     R"(,"shape":[1],"data_offsets":[4,8]}})",
                 bytes_t(8)),
       "duplicate tensor name 't'"},
      {"overlapping offsets",
       make_file(R"({"a":{)" + f32 + R"(,"shape":[2],"data_offsets":[0,8]},"b":{)" + f32 +
                     R"(,"shape":[1],"data_offsets":[4,8]}})",
                 bytes_t(8)),
       "overlap"},
      {"offsets past the data", make_file(R"({"t":{)" + f32 + R"(,"shape":[2],"data_offsets":[0,8]}})", bytes_t(4)),
       "outside the data"},
      {"offsets reversed", make_file(R"({"t":{)" + f32 + R"(,"shape":[0],"data_offsets":[4,0]}})", bytes_t(4)),
       "outside the data"},
      {"offsets 2^64", make_file(R"({"t":{)" + f32 + R"(,"shape":[1],"data_offsets":[0,18446744073709551616]}})"),
       "data_offsets is not"},
      {"offsets negative", make_file(R"({"t":{)" + f32 + R"(,"shape":[1],"data_offsets":[-4,0]}})"),
       "data_offsets is not"},
      {"offsets and shape disagree", make_file(R"({"t":{)" + f32 + R"(,"shape":[3],"data_offsets":[0,8]}})", bytes_t(8)),
       "needs 12"},
      {"shape product overflows",
       make_file(R"({"t":{)" + f32 + R"(,"shape":[4294967296,4294967296,2],"data_offsets":[0,0]}})"), "overflows"},
      {"byte count overflows", make_file(R"({"t":{)" + f32 + R"(,"shape":[4611686018427387904],"data_offsets":[0,0]}})"),
       "overflows"},
      {"negative dimension", make_file(R"({"t":{)" + f32 + R"(,"shape":[-1],"data_offsets":[0,0]}})"),
       "non-negative integer"},
      {"fractional dimension", make_file(R"({"t":{)" + f32 + R"(,"shape":[1.5],"data_offsets":[0,0]}})"),
       "non-negative integer"},
      {"shape not an array", make_file(R"({"t":{)" + f32 + R"(,"shape":4,"data_offsets":[0,16]}})", bytes_t(16)),
       "shape is not an array"},
      {"missing field", make_file(R"({"t":{)" + f32 + R"(,"shape":[1]}})", bytes_t(4)), "needs dtype, shape"},
      {"unknown field", make_file(R"({"t":{)" + f32 + R"(,"shape":[1],"data_offsets":[0,4],"x":1}})", bytes_t(4)),
       "unknown field 'x'"},
      {"entry not an object", make_file(R"({"t":[1,2]})"), "not an object"},
      {"gap in the data", make_file(R"({"t":{)" + f32 + R"(,"shape":[1],"data_offsets":[4,8]}})", bytes_t(8)),
       "gap"},
      {"trailing bytes", make_file(R"({"t":{)" + f32 + R"(,"shape":[1],"data_offsets":[0,4]}})", bytes_t(12)),
       "cover 4 bytes"},
      {"metadata not strings", make_file(R"({"__metadata__":{"a":1}})"), "__metadata__ entry 'a'"},
      {"metadata not an object", make_file(R"({"__metadata__":[]})"), "__metadata__ is not"},
      {"empty header", make_file(""), "must start with '{'"},
      {"invalid UTF-8 in a name", make_file("{\"t\xff\":{}}"), "not valid JSON"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    CHECK_THROWS_WITH_AS(safetensors_file::parse(c.bytes, "hostile.safetensors"),
                         doctest::Contains(c.message), io_error);
    CHECK_THROWS_WITH_AS(safetensors_file::parse(c.bytes, "hostile.safetensors"),
                         doctest::Contains("'hostile.safetensors'"), io_error);
  }
  // every truncation of a valid file is rejected
  safetensors_writer out;
  const std::vector<float> v{1, 2, 3};
  out.add("x", std::span<const float>(v), {3});
  const auto good = out.serialize();
  for (std::size_t n = 0; n < good.size(); ++n)
    CHECK_THROWS_AS(safetensors_file::parse(std::span<const unsigned char>(good).first(n)), io_error);
  CHECK_NOTHROW(safetensors_file::parse(good));
}

TEST_CASE("the header parser refuses what JSON or the format forbids, naming the byte") {
  const std::string f32 = R"("dtype":"F32")";
  const std::string one = R"("shape":[1],"data_offsets":[0,4])";
  auto tensor = [&](const std::string& body) { return make_file(R"({"t":{)" + body + "}}", bytes_t(4)); };
  auto with_shape = [&](const std::string& dims) {
    return make_file(R"({"t":{"dtype":"U8","shape":[)" + dims + R"(],"data_offsets":[0,0]}})");
  };
  auto with_offsets = [&](const std::string& offsets) {
    return make_file(R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[)" + offsets + "]}}");
  };
  auto named = [&](const std::string& name) {
    return make_file("{\"" + name + R"(":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})");
  };
  std::string nul_header = R"({"t":{)" + f32 + "," + one + "}}";
  nul_header += std::string(1, '\0') + "junk";
  struct hostile {
    const char* what;
    bytes_t bytes;
    const char* message;
  };
  const std::vector<hostile> cases{
      // the same field twice in one entry (nlohmann/json kept the last)
      {"dtype twice", tensor(R"("dtype":"F64","dtype":"F32",)" + one), "the field 'dtype' appears twice"},
      {"shape twice", tensor(f32 + R"(,"shape":[1],"shape":[1],"data_offsets":[0,4])"),
       "the field 'shape' appears twice"},
      {"data_offsets twice", tensor(f32 + "," + one + R"(,"data_offsets":[0,4])"),
       "the field 'data_offsets' appears twice"},
      {"metadata key twice", make_file(R"({"__metadata__":{"k":"a","k":"b"}})"), "duplicate __metadata__ key 'k'"},
      {"metadata twice", make_file(R"({"__metadata__":{},"__metadata__":{}})"), "__metadata__ appears twice"},
      // NUL bytes and control characters
      {"a NUL byte followed by junk", make_file(nul_header, bytes_t(4)), "NUL byte at byte 62"},
      {"a NUL byte inside a name", named(std::string("a\0b", 3)), "NUL byte at byte 11"},
      {"a raw newline in a name", named("a\nb"), "control character byte 0x0a in a string"},
      {"a raw tab in metadata", make_file("{\"__metadata__\":{\"k\":\"a\tb\"}}"), "control character byte 0x09"},
      {"a control character between tokens", make_file("{\x01}"), "not valid JSON at byte 9"},
      // after the closing brace: whitespace only
      {"a second brace", make_file("{}}"), "unexpected '}' after the header's closing '}'"},
      {"junk after padding", make_file("{}      x"), "unexpected 'x' after"},
      {"a second object", make_file("{} {}"), "after the header's closing '}'"},
      // numbers: plain non-negative integers below 2^64
      {"a fraction in a shape", with_shape("1.0"), "shape holds something other than a non-negative integer"},
      {"an exponent in a shape", with_shape("1e2"), "a sign, a fraction or an exponent"},
      {"a plus sign in a shape", with_shape("+1"), "a sign, a fraction or an exponent"},
      {"minus zero in a shape", with_shape("-0"), "a sign, a fraction or an exponent"},
      {"a leading zero in a shape", with_shape("01"), "a leading zero"},
      {"a dimension of 2^64", with_shape("18446744073709551616"), "more than 64 bits"},
      {"a dimension of 10^30", with_shape("1000000000000000000000000000000"), "more than 64 bits"},
      {"a string in a shape", with_shape("\"1\""), "not a number"},
      {"true in a shape", with_shape("true"), "not a number"},
      {"an empty element", with_shape("1,,2"), "expected a value, found ','"},
      {"a trailing comma in a shape", with_shape("1,"), "expected a value, found ']'"},
      {"an offset of 2^64 + 5", with_offsets("0,18446744073709551621"), "data_offsets is not"},
      {"a fractional offset", with_offsets("0,0.0"), "data_offsets is not"},
      {"a leading zero in an offset", with_offsets("00,0"), "a leading zero"},
      {"three offsets", with_offsets("0,0,0"), "more than two numbers"},
      {"one offset", with_offsets("0"), "(1 number at"},
      {"no offsets", with_offsets(""), "(0 numbers"},
      // nesting: no deeper than the header, an entry and a shape
      {"an array in a shape", with_shape("[1]"), "nests deeper"},
      {"an object in metadata", make_file(R"({"__metadata__":{"k":{"a":{}}}})"), "nests deeper"},
      {"an object as metadata value", make_file(R"({"__metadata__":{"k":{}}})"), "__metadata__ entry 'k' is not"},
      {"null as an entry", make_file(R"({"t":null})"), "not an object"},
      {"a string as an entry", make_file(R"({"t":"x"})"), "not an object"},
      {"a broken value as an entry", make_file(R"({"t":nul})"), "not valid JSON at byte 13"},
      // strings: JSON's escapes, valid UTF-8
      {"an unknown escape", named("a\\xb"), "invalid escape '\\x'"},
      {"a short \\u escape", named("a\\u12"), "four hex digits"},
      {"a lone high surrogate", named("a\\ud83db"), "not followed by the \\u escape of a low one"},
      {"a high surrogate then a non-surrogate", named("\\ud83d\\u0041"), "not followed by the \\u escape of a low"},
      {"a lone low surrogate", named("\\ude00"), "low surrogate without a high one"},
      {"an overlong encoding", named("\xc0\xaf"), "invalid UTF-8"},
      {"an overlong three-byte encoding", named("\xe0\x80\xaf"), "invalid UTF-8"},
      {"an encoded surrogate", named("\xed\xa0\x80"), "invalid UTF-8"},
      {"a code point above U+10FFFF", named("\xf4\x90\x80\x80"), "invalid UTF-8"},
      {"a continuation byte alone", named("\x80"), "invalid UTF-8"},
      {"a sequence cut by the quote", named("\xe2\x82"), "invalid UTF-8"},
      {"an unterminated string", make_file(R"({"t)"), "not terminated"},
      {"a header ending after a name", make_file(R"({"t")"), "ends where ':' after a name was expected"},
      {"a trailing comma in the header", make_file(R"({"__metadata__":{},})"), "expected a tensor name"},
      {"a name that is not a string", make_file(R"({t:1})"), "expected a tensor name (a string), found 't'"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    CHECK_THROWS_WITH_AS(safetensors_file::parse(c.bytes, "hostile.safetensors"), doctest::Contains(c.message),
                         io_error);
    CHECK_THROWS_WITH_AS(safetensors_file::parse(c.bytes, "hostile.safetensors"),
                         doctest::Contains("'hostile.safetensors'"), io_error);
  }
}

TEST_CASE("the header parser accepts every JSON spelling of a valid header") {
  // whitespace between all tokens and after the closing brace; fields in any order
  const std::string spaced = "{\n\t\"__metadata__\" :\r{ \"k\" : \"v\" , \"e\":\"\" } ,\n"
                             "  \"t\" : { \"data_offsets\" : [ 0 , 4 ] , \"shape\" : [ 1 ] , \"dtype\" : \"F32\" }\n} \n\t\r ";
  const auto file = safetensors_file::parse(make_file(spaced, bytes_t{0, 0, 0x80, 0x3F}));
  CHECK(file.read<float>("t") == std::vector<float>{1.0f});
  CHECK(file.metadata().at("k") == "v");
  CHECK(file.metadata().at("e").empty());
  // every escape, surrogate pairs and raw UTF-8, decoded
  const std::string escaped = R"(a\"b\\c\/d\b\f\n\r\t\u0041\u00e9\u20ac\ud83d\ude00\uD83D\uDE00\u0000z)";
  const std::string decoded = std::string("a\"b\\c/d\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf0\x9f\x98\x80") +
                              std::string(1, '\0') + "z";
  const std::string raw = "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf";  // é € 😀 U+10FFFF
  const auto names = safetensors_file::parse(make_file(
      "{\"" + escaped + R"(":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},")" + raw +
      R"(":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"__metadata__":{"\u006b":"\ud800\udc00"}})"));
  CHECK(names.contains(decoded));
  CHECK(names.contains(raw));
  CHECK(names.metadata().at("k") == "\xf0\x90\x80\x80");
  // the largest integers: 2^64 - 1 parses (and is then refused by the size checks, not the parser)
  CHECK_THROWS_WITH_AS(safetensors_file::parse(make_file(
                           R"({"t":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})")),
                       doctest::Contains("hold 0 bytes, but U8 [18446744073709551615] needs 18446744073709551615"),
                       io_error);
  CHECK_THROWS_WITH_AS(safetensors_file::parse(make_file(
                           R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[0,18446744073709551615]}})")),
                       doctest::Contains("lie outside the data"), io_error);
  // empty shapes, empty objects, a tensor called "" and one called like a field
  const auto small = safetensors_file::parse(make_file(
      R"({"":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"dtype":{"dtype":"BOOL","shape":[0],"data_offsets":[4,4]}})",
      bytes_t(4)));
  CHECK(small.at("").shape.empty());
  CHECK(small.at("dtype").type == dtype::boolean);
  CHECK(safetensors_file::parse(make_file("{ }")).tensors().empty());
  CHECK(safetensors_file::parse(make_file(R"({"__metadata__":{ }})")).metadata().empty());
}

TEST_CASE("a header of 200 000 entries parses and is written (in time linear in its size)") {
  // With nlohmann/json's parse callback this took minutes (20 000 entries: 6 s, growing with the
  // square). Tiny tensors of 4 bytes, listed in reverse data order, and metadata at the end.
  constexpr std::size_t n = 200'000;
  std::string header = "{";
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t begin = 4 * (n - 1 - i);
    header += "\"block." + std::to_string(i) + ".experts.weight\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" +
              std::to_string(begin) + "," + std::to_string(begin + 4) + "]},";
  }
  header += R"("__metadata__":{"format":"pt"}})";
  while ((8 + header.size()) % 8 != 0) header += ' ';
  bytes_t data(4 * n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto v = std::bit_cast<std::uint32_t>(static_cast<float>(i));
    detail::store_le(data.data() + 4 * (n - 1 - i), v, 4);
  }
  const auto file = safetensors_file::parse(make_file(header, data), "large.safetensors");
  REQUIRE(file.tensors().size() == n);
  CHECK(file.tensors().front().name == "block." + std::to_string(n - 1) + ".experts.weight");  // data order
  CHECK(file.read<float>("block.0.experts.weight") == std::vector<float>{0.0f});
  CHECK(file.read<float>("block.123456.experts.weight") == std::vector<float>{123456.0f});
  CHECK(file.at("block.199999.experts.weight").begin == 0);
  CHECK(file.metadata().at("format") == "pt");
  // a duplicate at the very end is still found
  const auto dup = header.substr(0, header.find_last_of('}')) + R"(,"block.7.experts.weight":{}})";
  CHECK_THROWS_WITH_AS(safetensors_file::parse(make_file(dup, data)), doctest::Contains("duplicate tensor name 'block.7"),
                       io_error);
  // the writer too is linear (it was quadratic through nlohmann::ordered_json: 40 000 tensors, 3 s)
  safetensors_writer out;
  out.metadata("format", "pt");
  for (std::size_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(i);
    out.add("block." + std::to_string(i) + ".experts.weight", std::span<const float>(&v, 1), {1});
  }
  const auto written = safetensors_file::parse(out.serialize());
  REQUIRE(written.tensors().size() == n);
  CHECK(written.tensors().front().name == "block.0.experts.weight");
  CHECK(written.read<float>("block.123456.experts.weight") == std::vector<float>{123456.0f});
}

TEST_CASE("the writer rejects inconsistent tensors") {
  safetensors_writer out;
  const std::vector<float> v(6);
  CHECK_THROWS_WITH_AS(out.add("t", std::span<const float>(v), {2, 2}), doctest::Contains("has 6 values"),
                       value_error);
  out.add("t", std::span<const float>(v), {2, 3});
  CHECK_THROWS_WITH_AS(out.add("t", std::span<const float>(v), {6}), doctest::Contains("already used"), value_error);
  CHECK_THROWS_AS(out.add("__metadata__", std::span<const float>(v), {6}), value_error);
  CHECK_THROWS_WITH_AS(out.add("u", std::span<const float>(v), {6}, dtype::i32),
                       doctest::Contains("not F16, BF16, F32 or F64"), value_error);
  CHECK_THROWS_WITH_AS(out.add("bad\xff", std::span<const float>(v), {6}), doctest::Contains("not valid UTF-8"),
                       value_error);
  CHECK_THROWS_AS(out.metadata("k", "\xc3"), value_error);
  CHECK(out.size() == 1);
}

TEST_CASE("saving is atomic: a failed save leaves the old file and no temporary") {
  const auto path = scratch("atomic.safetensors");
  const auto dir = path.parent_path();
  const std::vector<double> v{1, 2};
  safetensors_writer out;
  out.add("v", std::span<const double>(v), {2});
  out.save(path);
  CHECK(safetensors_file::open(path).read<double>("v") == v);
  CHECK(leftovers(dir) == 0);

  // overwrite: the new content replaces the old
  safetensors_writer next;
  const std::vector<double> w{3, 4, 5};
  next.add("v", std::span<const double>(w), {3});
  next.save(path);
  CHECK(safetensors_file::open(path).read<double>("v") == w);

  // renaming onto a directory fails after the temporary was written: it must be removed
  const auto blocked = scratch("blocked.safetensors");
  fs::create_directories(blocked / "inside");
  CHECK_THROWS_WITH_AS(out.save(blocked), doctest::Contains("blocked.safetensors"), io_error);
  CHECK(fs::is_directory(blocked / "inside"));
  CHECK(leftovers(dir) == 0);

  // a directory that does not exist
  CHECK_THROWS_AS(out.save(dir / "no" / "such" / "dir.safetensors"), io_error);
  CHECK_THROWS_WITH_AS(safetensors_file::open(dir / "missing.safetensors"), doctest::Contains("missing.safetensors"),
                       io_error);
  CHECK(leftovers(dir) == 0);

  // a corrupt file on disk is reported with its path
  const auto bad = scratch("corrupt.safetensors");
  {
    std::ofstream o(bad, std::ios::binary);
    o << "\x10\0\0\0\0\0\0\0{";
  }
  CHECK_THROWS_WITH_AS(safetensors_file::open(bad), doctest::Contains("corrupt.safetensors"), io_error);
}

TEST_CASE("saving: file names up to NAME_MAX, temporaries of killed saves cleaned up") {
  const auto dir = fresh_dir("names");
  // the temporary's name is short, so the longest valid file name saves
  const std::string longest = std::string(255 - 12, 'n') + ".safetensors";
  save_values(dir / longest, {1, 2});
  CHECK(saved_values(dir / longest) == std::vector<double>{1, 2});
  save_values(dir / longest, {3});  // and is overwritten
  CHECK(saved_values(dir / longest) == std::vector<double>{3});
  CHECK_THROWS_WITH_AS(save_values(dir / ("n" + longest), {1}), doctest::Contains("(the file was left as it was)"),
                       io_error);  // 256 characters: too long for the file system, nothing left behind
  CHECK(leftovers(dir) == 0);

  // temporaries as a killed save leaves them: pid 2147483647 cannot exist (pids stay below
  // 2^22 on Linux), so kill() answers ESRCH
  const auto clean = fresh_dir("orphans");
  const auto old_enough = fs::file_time_type::clock::now() - std::chrono::hours(2);
  auto orphan = [&](const std::string& name, bool old) {
    write_text(clean / name, "partial");
    if (old) fs::last_write_time(clean / name, old_enough);
    return clean / name;
  };
  const auto dead = orphan(".smear-2147483647-00000000deadbeef.tmp", true);
  const auto dead_recent = orphan(".smear-2147483647-0000000000000001.tmp", false);  // within the hour: kept
  const auto mine = orphan(".smear-" + std::to_string(::getpid()) + "-00000000000000aa.tmp", true);  // alive
  const auto init = orphan(".smear-1-00000000000000bb.tmp", true);                // pid 1 is alive
  const auto not_ours = orphan(".smear-2147483647-0000000dead.tmp", true);       // not 16 hex digits
  const auto upper = orphan(".smear-2147483647-00000000DEADBEEF.tmp", true);     // not our spelling
  const auto user_file = orphan("2147483647.tmp", true);
  save_values(clean / "model.safetensors", {1});
  CHECK_FALSE(fs::exists(dead));
  for (const auto& kept : {dead_recent, mine, init, not_ours, upper, user_file}) {
    CAPTURE(kept.filename().string());
    CHECK(fs::exists(kept));
  }
  CHECK(saved_values(clean / "model.safetensors") == std::vector<double>{1});
  // a failed save removes nothing but its own temporary
  const auto dead_again = orphan(".smear-2147483647-00000000deadbee2.tmp", true);
  fs::create_directories(clean / "blocked.safetensors" / "inside");
  CHECK_THROWS_AS(save_values(clean / "blocked.safetensors", {1}), io_error);
  CHECK(fs::exists(dead_again));
}

TEST_CASE("saving through a symbolic link replaces its target; overwriting keeps the permissions") {
  const auto dir = fresh_dir("links");
  const auto other = fresh_dir("links-target");
  // a relative link in the same directory
  save_values(dir / "real.safetensors", {1});
  fs::create_symlink("real.safetensors", dir / "link.safetensors");
  save_values(dir / "link.safetensors", {2, 3});
  CHECK(fs::is_symlink(dir / "link.safetensors"));
  CHECK(fs::read_symlink(dir / "link.safetensors") == "real.safetensors");
  CHECK(saved_values(dir / "link.safetensors") == std::vector<double>{2, 3});
  CHECK(saved_values(dir / "real.safetensors") == std::vector<double>{2, 3});
  // a chain of links, the last one absolute and into another directory: the temporary is made there
  save_values(other / "weights.safetensors", {4});
  fs::create_symlink(other / "weights.safetensors", dir / "absolute.safetensors");
  fs::create_symlink("absolute.safetensors", dir / "chain.safetensors");
  save_values(dir / "chain.safetensors", {5});
  CHECK(fs::is_symlink(dir / "chain.safetensors"));
  CHECK(fs::is_symlink(dir / "absolute.safetensors"));
  CHECK(saved_values(other / "weights.safetensors") == std::vector<double>{5});
  // a dangling link gets its target
  fs::create_symlink("later.safetensors", dir / "dangling.safetensors");
  save_values(dir / "dangling.safetensors", {6});
  CHECK(fs::is_symlink(dir / "dangling.safetensors"));
  CHECK(saved_values(dir / "later.safetensors") == std::vector<double>{6});
  // a loop of links is an io_error, not a hang
  fs::create_symlink("loop-b", dir / "loop-a");
  fs::create_symlink("loop-a", dir / "loop-b");
  CHECK_THROWS_WITH_AS(save_values(dir / "loop-a", {1}), doctest::Contains("more than 40 symbolic links"), io_error);
  CHECK(leftovers(dir) == 0);
  CHECK(leftovers(other) == 0);

  // permissions: an overwritten file keeps its bits, directly and through a link
  fs::permissions(dir / "real.safetensors", fs::perms::owner_read | fs::perms::owner_write);
  save_values(dir / "real.safetensors", {7});
  CHECK(permissions(dir / "real.safetensors") == (fs::perms::owner_read | fs::perms::owner_write));
  fs::permissions(dir / "real.safetensors", fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  save_values(dir / "link.safetensors", {8});
  CHECK(permissions(dir / "real.safetensors") ==
        (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read));
  CHECK(saved_values(dir / "real.safetensors") == std::vector<double>{8});
  // even bits the umask would clear, and a read-only file (the save replaces it, as rename does)
  const auto mask = ::umask(022);
  fs::permissions(dir / "real.safetensors", fs::perms::owner_read | fs::perms::group_write | fs::perms::others_write);
  save_values(dir / "real.safetensors", {9});
  CHECK(permissions(dir / "real.safetensors") ==
        (fs::perms::owner_read | fs::perms::group_write | fs::perms::others_write));
  // a new file: 0666 & ~umask
  save_values(dir / "new.safetensors", {1});
  CHECK(permissions(dir / "new.safetensors") ==
        (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read));
  ::umask(mask);
  CHECK(leftovers(dir) == 0);
}
