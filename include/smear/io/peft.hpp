#pragma once
/// \file io/peft.hpp
/// PEFT LoRA adapters as smear's LoRA experts: N adapter directories in, N out.
///
/// A PEFT LoRA adapter (Hugging Face `peft`, `model.save_pretrained(dir)`) is a directory with
///
///     adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
///                                  "target_modules": ["q", "v"], "bias": "none", ...}
///     adapter_model.safetensors   base_model.model.<module>.lora_A.weight  [r, in]
///                                 base_model.model.<module>.lora_B.weight  [out, r]
///
/// for every adapted module, e.g. `encoder.block.0.layer.0.SelfAttention.q`. PEFT computes
/// y = x·W₀ᵀ + b₀ + s·(x·Aᵀ)·Bᵀ with s = lora_alpha / r (lora_alpha / √r with `use_rslora`),
/// W₀ [out, in] being the base model's `<module>.weight` (torch.nn.Linear's layout). smear's
/// lora expert holds the transposes, `lora_a` = Aᵀ [in, r] and `lora_b` = Bᵀ [r, out], its
/// frozen map W₀ᵀ [in, out], and s = alpha / rank (lora_options::alpha).
///
/// load_peft() reads one module's LoRA from each of N adapters into the experts of a bank or
/// layer (expert e from directory e): the configs must name the module among their
/// target_modules (a list of names matched as the last components of the module's name, or
/// one regular expression matched against the whole name, as PEFT does), and every adapter's
/// rank, shapes and scale must be the experts' (rank_pattern and alpha_pattern are applied).
/// PEFT features smear's LoRA expert does not have are refused, never dropped: DoRA
/// (`use_dora`), trained biases (`bias` other than "none"), a non-LORA `peft_type`. Everything
/// is read and checked before anything changes: on an io_error the bank is as it was.
///
/// save_peft() writes a bank back as N such directories (created when missing; each file
/// replaced atomically) that PEFT's `PeftModel.from_pretrained(base, dir)` loads.
///
/// read_peft_base() reads the frozen map from the base model's safetensors file, so that
///
/// ```
/// auto base = smear::read_peft_base<float>("t5/model.safetensors", module);
/// auto info = smear::read_peft_config(dirs[0], module);
/// smear::layer<smear::lora<float>, 4> block{
///     smear::lora<float>{base.in, base.out, info.rank, base.weight, base.bias, info.options()}};
/// smear::load_peft(block, dirs, module);
/// ```
///
/// builds a SMEAR block over four fine-tuned LoRAs of one module. Link `smear::io`.

#include <cmath>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <optional>
// GCC 12 to 14 report a false -Wmaybe-uninitialized inside std::regex's compiler when built
// with -fsanitize=address (GCC bug 105616); the state set around the include covers the code
// instantiated from it
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <regex>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "smear/bank.hpp"
#include "smear/error.hpp"
#include "smear/experts/lora.hpp"
#include "smear/io/safetensors.hpp"
#include "smear/layer.hpp"

namespace smear {

/// What a PEFT adapter_config.json says of one module's LoRA.
struct peft_config {
  std::size_t rank = 0;    ///< r (rank_pattern's entry for the module, when it has one)
  double alpha = 0.0;      ///< lora_alpha (alpha_pattern's entry, when it has one)
  bool rslora = false;     ///< use_rslora: s = alpha / √r
  bool fan_in_fan_out = false;  ///< the base layer stores its weight [in, out] (GPT-2's Conv1D)
  std::string base_model;  ///< base_model_name_or_path ("" when absent or null)

  /// PEFT's scale s of the update.
  double scaling() const {
    return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
  }
  /// The lora_options that give smear's expert this scale (alpha = s·rank).
  lora_options options(lora_options o = {}) const {
    o.alpha = scaling() * static_cast<double>(rank);
    return o;
  }
};

/// The frozen map of a base model's linear module, in smear's layout.
template <class T>
struct peft_base {
  std::size_t in = 0;
  std::size_t out = 0;
  std::vector<T> weight;  ///< W₀ᵀ, [in, out] row-major (lora's frozen_weight)
  std::vector<T> bias;    ///< b₀ [out], or empty when the module has none
};

/// How save_peft() writes adapters.
struct peft_save_options {
  std::string base_model{};                     ///< base_model_name_or_path
  std::optional<smear::dtype> dtype{};          ///< stored dtype; default: the bank's T
};

namespace detail {

inline constexpr std::string_view peft_prefix = "base_model.model.";

/// The module's name as the base model knows it (without PEFT's "base_model.model.").
inline std::string peft_module(std::string_view module) {
  return std::string(module.starts_with(peft_prefix) ? module.substr(peft_prefix.size()) : module);
}

/// The adapter file's name of one of the module's tensors ("lora_A", "lora_B").
inline std::string peft_key(std::string_view module, std::string_view which) {
  return std::string(peft_prefix) + peft_module(module) + "." + std::string(which) + ".weight";
}

inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw io_error(message("smear::load_peft: cannot open '", path.string(), "'"));
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw io_error(message("smear::load_peft: '", path.string(), "' is not valid JSON: ", e.what()));
  }
}

/// The LoRA modules `file` holds (its lora_A tensors), for messages.
inline std::string peft_modules(const safetensors_file& file) {
  constexpr std::string_view suffix = ".lora_A.weight";
  std::string out;
  std::size_t listed = 0;
  for (const auto& t : file.tensors()) {
    if (!std::string_view(t.name).ends_with(suffix)) continue;
    if (++listed > 8) {
      out += ", ...";
      break;
    }
    out += (out.empty() ? "" : ", ") + peft_module(std::string_view(t.name).substr(0, t.name.size() - suffix.size()));
  }
  return out.empty() ? "none" : out;
}

/// One module's LoRA read from an adapter directory: A [r, in] and B [out, r].
template <class T>
struct peft_lora {
  peft_config config;
  std::size_t in = 0, out = 0;
  std::vector<T> a, b;
};

}  // namespace detail

/// The config of `module`'s LoRA in the PEFT adapter directory `dir` (adapter_config.json).
/// Throws io_error when the file is missing or malformed, is not a LoRA, uses what smear's
/// LoRA expert cannot hold (DoRA, trained biases), or does not target `module`.
inline peft_config read_peft_config(const std::filesystem::path& dir, std::string_view module) {
  const auto path = dir / "adapter_config.json";
  const std::string where = path.string();
  const auto j = detail::read_json(path);
  auto fail = [&](auto&&... what) -> io_error {
    return io_error(detail::message("smear::load_peft: '", where, "': ", what...));
  };
  if (!j.is_object()) throw fail("expected a JSON object");
  const std::string name = detail::peft_module(module);
  // PEFT's regular expressions match the whole name (re.fullmatch)
  auto matches = [&](const std::string& pattern, const std::string& field) {
    try {
      return std::regex_match(name, std::regex(pattern));
    } catch (const std::regex_error& e) {
      throw fail(field, " '", pattern, "' is not a regular expression: ", e.what());
    }
  };
  try {
    if (j.value("peft_type", std::string("LORA")) != "LORA")
      throw fail("peft_type is '", j.at("peft_type").get<std::string>(), "', smear reads LORA adapters");
    if (j.contains("use_dora") && !j.at("use_dora").is_null() && j.at("use_dora").get<bool>())
      throw fail("use_dora is true; smear's LoRA expert has no DoRA magnitude vector");
    if (const auto bias = j.value("bias", std::string("none")); bias != "none")
      throw fail("bias is '", bias, "'; smear's LoRA expert trains no biases (PEFT's bias = \"none\")");
    peft_config c;
    if (!j.contains("r") || !j.at("r").is_number_integer() || j.at("r").get<long long>() <= 0)
      throw fail("'r' must be a positive integer");
    c.rank = j.at("r").get<std::size_t>();
    c.alpha = j.contains("lora_alpha") ? j.at("lora_alpha").get<double>() : 8.0;  // PEFT's default
    c.rslora = j.contains("use_rslora") && !j.at("use_rslora").is_null() && j.at("use_rslora").get<bool>();
    c.fan_in_fan_out = j.contains("fan_in_fan_out") && j.at("fan_in_fan_out").get<bool>();
    if (j.contains("base_model_name_or_path") && j.at("base_model_name_or_path").is_string())
      c.base_model = j.at("base_model_name_or_path").get<std::string>();
    // the module must be one the adapter targets
    const auto& targets = j.contains("target_modules") ? j.at("target_modules") : nlohmann::json();
    bool targeted = false;
    std::string listed;
    if (targets.is_string()) {
      listed = targets.get<std::string>();
      targeted = matches(listed, "target_modules");
    } else if (targets.is_array()) {
      for (const auto& t : targets) {
        const auto s = t.get<std::string>();
        listed += (listed.empty() ? "" : ", ") + s;
        targeted = targeted || name == s || name.ends_with("." + s);
      }
    } else {
      throw fail("target_modules must be a list of names or a regular expression");
    }
    if (!targeted)
      throw fail("target_modules (", listed, ") do not include module '", name, "'");
    // rank_pattern / alpha_pattern: the first key that selects the module, as PEFT's
    // get_pattern_key does ("(.*\.)?(key)")
    auto pattern_value = [&](const char* pattern) -> const nlohmann::json* {
      if (!j.contains(pattern) || j.at(pattern).is_null()) return nullptr;
      for (const auto& [key, value] : j.at(pattern).items())
        if (matches("(.*\\.)?(" + key + ")", std::string(pattern) + " key")) return &value;
      return nullptr;
    };
    if (const auto* r = pattern_value("rank_pattern")) {
      if (!r->is_number_integer() || r->get<long long>() <= 0)
        throw fail("rank_pattern's entry for '", name, "' must be a positive integer");
      c.rank = r->get<std::size_t>();
    }
    if (const auto* a = pattern_value("alpha_pattern")) c.alpha = a->get<double>();
    if (!std::isfinite(c.alpha)) throw fail("lora_alpha is not finite");
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw fail("unexpected field type: ", e.what());
  }
}

namespace detail {

template <class T>
peft_lora<T> read_peft_lora(const std::filesystem::path& dir, std::string_view module) {
  peft_lora<T> out{read_peft_config(dir, module), 0, 0, {}, {}};
  const auto file = safetensors_file::open(dir / "adapter_model.safetensors");
  const auto a_key = peft_key(module, "lora_A"), b_key = peft_key(module, "lora_B");
  const auto* a = file.find(a_key);
  const auto* b = file.find(b_key);
  if (!a || !b)
    throw io_error(message("smear::load_peft: '", file.name(), "' has no tensor '", !a ? a_key : b_key,
                           "'; it holds LoRAs of: ", peft_modules(file)));
  const std::size_t r = out.config.rank;
  if (a->shape.size() != 2 || a->shape[0] != r || b->shape.size() != 2 || b->shape[1] != r)
    throw io_error(message("smear::load_peft: '", file.name(), "': lora_A is ", shape_string(a->shape),
                           " and lora_B ", shape_string(b->shape), ", expected [r, in] and [out, r] with r = ", r,
                           " (adapter_config.json)"));
  out.in = a->shape[1];
  out.out = b->shape[0];
  out.a = file.read<T>(a_key);
  out.b = file.read<T>(b_key);
  return out;
}

}  // namespace detail

/// Loads `module`'s LoRA of adapter directory dirs[e] into expert e of `bank`, for every
/// expert; all or nothing. Throws io_error for a count of directories other than N, a rank,
/// shape or scale other than the experts' (naming the directory), what read_peft_config
/// refuses, and, with `finite`, a NaN or ±Inf value (naming the tensor and the index).
template <class T, std::size_t N>
void load_peft(expert_bank<lora<T>, N>& bank, std::span<const std::filesystem::path> dirs, std::string_view module,
               bool finite = false) {
  if (dirs.size() != N)
    throw io_error(detail::message("smear::load_peft: ", dirs.size(), " adapter directories for ", N, " experts"));
  const auto& expert = bank.expert();
  std::vector<std::vector<T>> staged(N);
  for (std::size_t e = 0; e < N; ++e) {
    const auto lora = detail::read_peft_lora<T>(dirs[e], module);
    const std::string where = dirs[e].string();
    if (lora.config.rank != expert.rank() || lora.in != expert.input_dim() || lora.out != expert.output_dim())
      throw io_error(detail::message("smear::load_peft: '", where, "': module '", detail::peft_module(module),
                                     "' has rank ", lora.config.rank, ", in ", lora.in, ", out ", lora.out,
                                     "; the experts have rank ", expert.rank(), ", in ", expert.input_dim(), ", out ",
                                     expert.output_dim()));
    if (finite)
      for (const auto& [which, values] : {std::pair{"lora_A", &lora.a}, std::pair{"lora_B", &lora.b}})
        for (std::size_t i = 0; i < values->size(); ++i)
          if (!std::isfinite((*values)[i]))
            throw io_error(detail::message("smear::load_peft: '", where, "': tensor '",
                                           detail::peft_key(module, which), "' holds ", (*values)[i],
                                           " at flat index ", i, "; the layer is in checked mode (check_finite)"));
    const double s = lora.config.scaling(), mine = static_cast<double>(expert.scale());
    if (std::abs(s - mine) > 1e-6 * std::max(std::abs(s), std::abs(mine)))
      throw io_error(detail::message("smear::load_peft: '", where, "': the adapter's scale lora_alpha / ",
                                     lora.config.rslora ? "sqrt(r)" : "r", " is ", s, ", the experts' is ", mine,
                                     " (build them with lora_options::alpha = ", s * static_cast<double>(expert.rank()),
                                     ", e.g. from read_peft_config(...).options())"));
    // smear's rows: lora_a = Aᵀ [in, r], then lora_b = Bᵀ [r, out]
    const std::size_t in = lora.in, out = lora.out, r = lora.config.rank;
    auto& row = staged[e];
    row.resize(bank.parameter_count());
    for (std::size_t i = 0; i < in; ++i)
      for (std::size_t k = 0; k < r; ++k) row[i * r + k] = lora.a[k * in + i];
    for (std::size_t k = 0; k < r; ++k)
      for (std::size_t o = 0; o < out; ++o) row[in * r + k * out + o] = lora.b[o * r + k];
  }
  for (std::size_t e = 0; e < N; ++e) std::copy(staged[e].begin(), staged[e].end(), bank[e].begin());
}

/// The same into a layer's bank (a layer in checked mode refuses non-finite values); its
/// inference cache is invalidated. A cuda layer's bank() is its host mirror: upload() after.
template <class T, std::size_t N, class Backend>
void load_peft(layer<lora<T>, N, Backend>& l, std::span<const std::filesystem::path> dirs, std::string_view module) {
  load_peft(l.bank(), dirs, module, l.options().check_finite);
  l.invalidate_cache();
}

/// Writes expert e of `bank` as `module`'s LoRA in the PEFT adapter directory dirs[e]
/// (adapter_config.json and adapter_model.safetensors, each replaced atomically; the directory
/// is created when missing).
template <class T, std::size_t N>
void save_peft(const expert_bank<lora<T>, N>& bank, std::span<const std::filesystem::path> dirs,
               std::string_view module, const peft_save_options& options = {}) {
  if (dirs.size() != N)
    throw value_error(detail::message("smear::save_peft: ", dirs.size(), " adapter directories for ", N, " experts"));
  const auto& expert = bank.expert();
  const std::size_t in = expert.input_dim(), out = expert.output_dim(), r = expert.rank();
  const std::string name = detail::peft_module(module);
  const auto last = name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1);
  nlohmann::ordered_json config{{"peft_type", "LORA"},
                                {"r", r},
                                {"lora_alpha", static_cast<double>(expert.scale()) * static_cast<double>(r)},
                                {"target_modules", nlohmann::json::array({last})},
                                {"bias", "none"},
                                {"fan_in_fan_out", false},
                                {"use_rslora", false},
                                {"use_dora", false},
                                {"lora_dropout", 0.0},
                                {"inference_mode", true},
                                {"base_model_name_or_path", options.base_model},
                                {"rank_pattern", nlohmann::json::object()},
                                {"alpha_pattern", nlohmann::json::object()},
                                {"task_type", nullptr}};
  const std::string text = config.dump(2) + "\n";
  std::vector<T> a(r * in), b(out * r);
  for (std::size_t e = 0; e < N; ++e) {
    const auto row = bank[e];
    for (std::size_t i = 0; i < in; ++i)
      for (std::size_t k = 0; k < r; ++k) a[k * in + i] = row[i * r + k];
    for (std::size_t k = 0; k < r; ++k)
      for (std::size_t o = 0; o < out; ++o) b[o * r + k] = row[in * r + k * out + o];
    safetensors_writer w;
    w.metadata("format", "pt");
    w.add(detail::peft_key(name, "lora_A"), std::span<const T>(a), {r, in}, options.dtype);
    w.add(detail::peft_key(name, "lora_B"), std::span<const T>(b), {out, r}, options.dtype);
    std::error_code ec;
    std::filesystem::create_directories(dirs[e], ec);
    if (ec)
      throw io_error(detail::message("smear::save_peft: cannot create '", dirs[e].string(), "': ", ec.message()));
    w.save(dirs[e] / "adapter_model.safetensors");
    safetensors_writer::write_atomically(
        dirs[e] / "adapter_config.json",
        std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(text.data()), text.size()));
  }
}

/// The same from a layer's bank (a cuda layer's host mirror: download() first).
template <class T, std::size_t N, class Backend>
void save_peft(const layer<lora<T>, N, Backend>& l, std::span<const std::filesystem::path> dirs,
               std::string_view module, const peft_save_options& options = {}) {
  save_peft(l.bank(), dirs, module, options);
}

/// The frozen map of `module` from the base model's safetensors file: `<module>.weight`
/// [out, in] (torch.nn.Linear's layout; [in, out] with `fan_in_fan_out`) transposed to
/// smear's [in, out], and `<module>.bias` [out] when present. Throws io_error naming the file
/// and the tensor when it is missing or not a matrix.
template <class T>
peft_base<T> read_peft_base(const safetensors_file& file, std::string_view module, bool fan_in_fan_out = false) {
  const std::string name = detail::peft_module(module);
  const auto& w = file.at(name + ".weight");
  if (w.shape.size() != 2)
    throw io_error(detail::message("smear::read_peft_base: '", file.name(), "': '", w.name, "' is ",
                                   detail::shape_string(w.shape), ", expected a matrix"));
  peft_base<T> out;
  out.out = fan_in_fan_out ? w.shape[1] : w.shape[0];
  out.in = fan_in_fan_out ? w.shape[0] : w.shape[1];
  auto values = file.read<T>(w.name);
  if (fan_in_fan_out) {
    out.weight = std::move(values);
  } else {
    out.weight.resize(values.size());
    for (std::size_t o = 0; o < out.out; ++o)
      for (std::size_t i = 0; i < out.in; ++i) out.weight[i * out.out + o] = values[o * out.in + i];
  }
  if (const auto* b = file.find(name + ".bias")) {
    if (b->shape != std::vector<std::size_t>{out.out})
      throw io_error(detail::message("smear::read_peft_base: '", file.name(), "': '", b->name, "' is ",
                                     detail::shape_string(b->shape), ", expected [out] = [", out.out, "]"));
    out.bias = file.read<T>(b->name);
  }
  return out;
}

/// The same from the file at `path`.
template <class T>
peft_base<T> read_peft_base(const std::filesystem::path& path, std::string_view module, bool fan_in_fan_out = false) {
  return read_peft_base<T>(safetensors_file::open(path), module, fan_in_fan_out);
}

}  // namespace smear
