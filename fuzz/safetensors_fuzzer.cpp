// libFuzzer target for the safetensors loader: any input must either load or throw
// smear::io_error; anything else (a crash, a sanitizer report, another exception, a leak)
// is a bug. Inputs that parse are read in both precisions, loaded into a small bank and
// router (names from the checkpoint scheme), written back and parsed again.
//
// An input that starts with '{' is also tried as a header alone: framed by its own length, with
// no data. Mutations rarely keep the 8-byte length prefix consistent with a header they change,
// so this route takes every mutated header text straight to the parser.

#include <smear/io/checkpoint.hpp>
#include <smear/smear.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace {

void check(std::span<const unsigned char> bytes) {
  try {
    const auto file = smear::safetensors_file::parse(bytes, "fuzz input");
    smear::safetensors_writer again;
    for (const auto& t : file.tensors()) {
      if (!smear::is_floating(t.type)) continue;
      const auto f = file.read<float>(t.name);
      const auto d = file.read<double>(t.name);
      if (f.size() != t.elements() || d.size() != t.elements()) __builtin_trap();
      again.add(t.name, std::span<const double>(d), t.shape, t.type);
    }
    for (const auto& [key, value] : file.metadata()) again.metadata(key, value);
    const auto back = smear::safetensors_file::parse(again.serialize(), "fuzz output");  // must be valid
    if (back.metadata() != file.metadata()) __builtin_trap();

    smear::expert_bank<smear::linear<float>, 2> bank{smear::linear<float>{2, 3}};
    smear::router<float> router{2, 2};
    try {
      smear::load(file, bank, "");
    } catch (const smear::io_error&) {
    }
    try {
      smear::load(file, router, "");
    } catch (const smear::io_error&) {
    }
  } catch (const smear::io_error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  check(std::span<const unsigned char>(data, size));
  if (size > 0 && data[0] == '{') {
    std::vector<unsigned char> framed(8 + size);
    smear::detail::store_le(framed.data(), size, 8);
    std::copy(data, data + size, framed.begin() + 8);
    check(framed);
  }
  return 0;
}
