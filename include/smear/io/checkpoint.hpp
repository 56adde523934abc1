#pragma once
/// \file io/checkpoint.hpp
/// Saving and loading expert banks, routers and whole SMEAR layers as safetensors files.
///
/// Naming scheme (one tensor per layout slot, never one per expert):
///
///     <prefix>experts.<slot>   shape [N, <slot shape>...]  the slot of every expert, expert e
///                                                          at index e of the leading axis
///     <prefix>router.<slot>    shape <slot shape>          the router's tensors
///
/// where the slots are those of the bank's and the router's layout(): for a layer of 8
/// `adapter<float>{768, 24}` experts saved with prefix "block.3.":
///
///     block.3.experts.down.weight        [8, 768, 24]
///     block.3.experts.down.bias          [8, 24]
///     block.3.experts.up.weight          [8, 24, 768]
///     block.3.router.layer_norm.weight   [768]
///     block.3.router.layer_norm.bias     [768]
///     block.3.router.weight              [8, 768]
///     block.3.router.bias                [8]
///
/// Layers whose strategy has no learned router (tag, hash, AdaMix, latent skills, Soft MoE) store no
/// router tensors; latent skills add `<prefix>skills.logits` [tasks, N], and REINFORCE with a
/// learned baseline adds `<prefix>baseline.parameters` [count] (its flat parameter vector),
/// cluster routing `<prefix>clusters` [N, d] (its centres), Soft MoE `<prefix>soft_moe.weight`
/// [d, N, s] (Φ) and `<prefix>soft_moe.scale` [N, s].
/// A layer also records its training-step count (which schedules read) as the `__metadata__`
/// entry `<prefix>smear.training_steps`; loading restores it when the entry is there.
///
/// In PyTorch these are `torch.stack([e.down.weight for e in experts])` etc.; beware that
/// `nn.Linear.weight` is [out, in] while the adapter's `down.weight` is [in, out].
///
/// Values are stored as the layer's T (F32 for float, F64 for double) unless save_options
/// asks for another dtype; loading converts F16, BF16, F32 and F64 to T. A `name_map` passed
/// to load() turns each of smear's names into the name to look up in the file, for files
/// that follow another scheme.
///
/// Loading checks every tensor it needs (present, floating-point, of exactly the expected
/// shape) and converts it into temporaries before it changes anything: on an io_error the
/// bank, router or layer is left exactly as it was. Gradients are not touched.
///
/// Link the `smear::io` CMake target (it adds nlohmann/json).

#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "smear/bank.hpp"
#include "smear/error.hpp"
#include "smear/io/safetensors.hpp"
#include "smear/layer.hpp"
#include "smear/layout.hpp"
#include "smear/routing/router.hpp"
#include "smear/version.hpp"

namespace smear {

/// Turns one of smear's tensor names (prefix included) into the name used in a file.
using name_map = std::function<std::string(std::string_view)>;

/// How load() reads a layer's checkpoint.
struct load_options {
  /// Load the tensors even when the file's recorded architecture (its `<prefix>smear.architecture`
  /// metadata: expert type and options, N, strategy, router) differs from the layer's.
  bool parameters_only = false;
};

/// How save() writes a checkpoint.
struct save_options {
  std::optional<smear::dtype> dtype{};          ///< stored dtype; default: the layer's T as is
  std::map<std::string, std::string> metadata{};///< extra `__metadata__` entries
  /// Values `dtype` cannot hold (beyond its range, or non-zero below its smallest subnormal):
  /// refused with a value_error naming the tensor, or saturated, the count then recorded as
  /// `__metadata__` "smear.saturated".
  smear::narrowing narrowing = smear::narrowing::refuse;
};

namespace detail {

/// A copy of a tensor's new values, waiting to be committed.
template <class T>
struct staged_values {
  std::span<T> destination;
  std::vector<T> values;
};

inline std::string mapped(const name_map& map, const std::string& name) {
  return map ? map(name) : name;
}

/// Reads the tensor that stands for `name` into `out` after checking its shape; with
/// `finite`, refuses a tensor holding NaN or ±Inf (a layer in checked mode loads only finite
/// parameters).
template <class T>
void read_checked(const safetensors_file& file, const std::string& name, const name_map& map,
                  const std::vector<std::size_t>& shape, const char* needed_by, std::span<T> out,
                  bool finite = false) {
  const std::string in_file = mapped(map, name);
  const auto* t = file.find(in_file);
  const std::string called = in_file == name ? "'" + name + "'" : "'" + in_file + "' (for '" + name + "')";
  if (!t)
    throw io_error(message("smear::load: '", file.name(), "' has no tensor ", called, ", which ", needed_by,
                           " needs with shape ", shape_string(shape)));
  if (!is_floating(t->type))
    throw io_error(message("smear::load: '", file.name(), "': tensor ", called, " has dtype ", to_string(t->type),
                           "; smear reads F16, BF16, F32 and F64"));
  if (t->shape != shape)
    throw io_error(message("smear::load: '", file.name(), "': tensor ", called, " has shape ",
                           shape_string(t->shape), ", ", needed_by, " needs ", shape_string(shape)));
  file.read(t->name, out);
  if (finite)
    for (std::size_t i = 0; i < out.size(); ++i)
      if (!std::isfinite(out[i]))
        throw io_error(message("smear::load: '", file.name(), "': tensor ", called, " holds ", out[i],
                               " at flat index ", i, "; the layer is in checked mode (check_finite)"));
}

/// Stages the bank's values read from `file`.
template <class Expert, std::size_t N>
staged_values<typename Expert::value_type> stage(const safetensors_file& file, expert_bank<Expert, N>& bank,
                                                 std::string_view prefix, const name_map& map, bool finite = false) {
  using T = typename Expert::value_type;
  auto dst = bank.values();
  const std::size_t P = bank.parameter_count();
  staged_values<T> out{{dst.data, N * P}, std::vector<T>(N * P)};
  std::vector<T> slot_values;
  for (const auto& s : bank.layout()) {
    std::vector<std::size_t> shape{N};
    shape.insert(shape.end(), s.shape.begin(), s.shape.end());
    slot_values.resize(N * s.size());
    read_checked(file, std::string(prefix) + "experts." + s.name, map, shape, "the expert bank",
                 std::span<T>(slot_values), finite);
    for (std::size_t e = 0; e < N; ++e)
      std::copy_n(slot_values.begin() + static_cast<std::ptrdiff_t>(e * s.size()), s.size(),
                  out.values.begin() + static_cast<std::ptrdiff_t>(e * P + s.offset));
  }
  return out;
}

/// Stages the values of a flat vector laid out by `layout` (the router's, Soft MoE's), one
/// tensor `<prefix><slot>` per slot.
template <class T>
staged_values<T> stage_slots(const safetensors_file& file, const parameter_layout& layout, std::span<T> values,
                             const std::string& prefix, const name_map& map, const char* needed_by, bool finite) {
  staged_values<T> out{values, std::vector<T>(values.size())};
  for (const auto& s : layout)
    read_checked(file, prefix + s.name, map, s.shape, needed_by, std::span<T>(out.values).subspan(s.offset, s.size()),
                 finite);
  return out;
}

/// Stages the router's values read from `file`.
template <class T>
staged_values<T> stage(const safetensors_file& file, router<T>& r, std::string_view prefix, const name_map& map,
                       bool finite = false) {
  return stage_slots(file, r.layout(), r.values(), std::string(prefix) + "router.", map, "the router", finite);
}

/// Adds each slot of a flat vector laid out by `layout` as `<prefix><slot>`.
template <class T>
void add_slots(safetensors_writer& out, const parameter_layout& layout, std::span<const T> values,
               const std::string& prefix, std::optional<dtype> as) {
  for (const auto& s : layout) out.add(prefix + s.name, values.subspan(s.offset, s.size()), s.shape, as);
}

template <class T>
void commit(const staged_values<T>& s) noexcept {
  std::copy(s.values.begin(), s.values.end(), s.destination.begin());
}

/// Whether the layer trains a learned REINFORCE baseline (which has parameters).
template <class Layer>
bool has_learned_baseline(const Layer& l) noexcept {
  const auto& s = l.strategy();
  return s.strategy == strategy::top_k && s.estimator == estimator::reinforce && s.baseline == baseline::learned;
}

/// The metadata key of a layer's training-step count.
inline std::string training_steps_key(std::string_view prefix) { return std::string(prefix) + "smear.training_steps"; }

/// The training-step count recorded for `prefix` in `file`, if any; io_error when the entry
/// is not a decimal count.
inline std::string architecture_key(std::string_view prefix) {
  return std::string(prefix) + "smear.architecture";
}

/// Throws io_error naming every difference between the architecture `file` records for
/// `prefix` and `layer`'s; a file that records none (written elsewhere, or before smear
/// recorded it) passes.
template <class Layer>
void check_architecture(const safetensors_file& file, const Layer& layer, std::string_view prefix) {
  const auto it = file.metadata().find(architecture_key(prefix));
  if (it == file.metadata().end()) return;
  const auto recorded = description::parse(it->second);
  if (!recorded)
    throw io_error(message("smear::load: '", file.name(), "': metadata '", it->first,
                           "' is not a list of key=value pairs: '", it->second, "'"));
  const std::string diff = description::differences(*recorded, layer.describe(), "the file", "the layer");
  if (!diff.empty())
    throw io_error(message("smear::load: '", file.name(), "' holds a different architecture",
                           prefix.empty() ? "" : " for prefix '", prefix, prefix.empty() ? "" : "'", ": ", diff,
                           " (load_options::parameters_only loads its tensors anyway)"));
}

inline std::optional<std::uint64_t> read_training_steps(const safetensors_file& file, std::string_view prefix) {
  const auto key = training_steps_key(prefix);
  const auto it = file.metadata().find(key);
  if (it == file.metadata().end()) return std::nullopt;
  const std::string& v = it->second;
  std::uint64_t n = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (v.empty() || ec != std::errc{} || end != v.data() + v.size())
    throw io_error(message("smear::load: '", file.name(), "': metadata '", key, "' is '", v,
                           "', expected a decimal training-step count"));
  return n;
}

inline void add_metadata(safetensors_writer& out, const save_options& options) {
  out.metadata("format", "pt");
  out.metadata("smear.version", std::to_string(SMEAR_VERSION_MAJOR) + "." + std::to_string(SMEAR_VERSION_MINOR) +
                                    "." + std::to_string(SMEAR_VERSION_PATCH));
  for (const auto& [k, v] : options.metadata) out.metadata(k, v);
}

}  // namespace detail

// ---- adding to a writer (several banks, routers or layers in one file) ----

/// Adds the bank's tensors, `<prefix>experts.<slot>` [N, ...], to `out`.
template <class Expert, std::size_t N>
void add(safetensors_writer& out, const expert_bank<Expert, N>& bank, std::string_view prefix = "",
         std::optional<dtype> as = std::nullopt) {
  using T = typename Expert::value_type;
  const auto values = bank.values();
  std::vector<T> slot_values;
  for (const auto& s : bank.layout()) {
    slot_values.resize(N * s.size());
    for (std::size_t e = 0; e < N; ++e) {
      const auto row = values.row(e).subspan(s.offset, s.size());
      std::copy(row.begin(), row.end(), slot_values.begin() + static_cast<std::ptrdiff_t>(e * s.size()));
    }
    std::vector<std::size_t> shape{N};
    shape.insert(shape.end(), s.shape.begin(), s.shape.end());
    out.add(std::string(prefix) + "experts." + s.name, std::span<const T>(slot_values), std::move(shape), as);
  }
}

/// Adds the router's tensors, `<prefix>router.<slot>`, to `out`.
template <class T>
void add(safetensors_writer& out, const router<T>& r, std::string_view prefix = "",
         std::optional<dtype> as = std::nullopt) {
  detail::add_slots(out, r.layout(), r.values(), std::string(prefix) + "router.", as);
}

/// Adds the layer's tensors to `out`: the bank, the router when the strategy uses one, the
/// latent skills and a learned REINFORCE baseline when present. Nothing in the layer changes
/// (a cuda layer saves its host mirrors: download() first).
template <class Expert, std::size_t N, class Backend>
void add(safetensors_writer& out, const layer<Expert, N, Backend>& l, std::string_view prefix = "",
         std::optional<dtype> as = std::nullopt) {
  using T = typename Expert::value_type;
  add(out, l.bank(), prefix, as);
  if (l.uses_router()) add(out, l.router(), prefix, as);
  if (l.strategy().strategy == strategy::latent_skills) {
    const auto logits = l.skills().logits();
    out.add(std::string(prefix) + "skills.logits", std::span<const T>(logits.data, logits.rows * logits.cols),
            {logits.rows, logits.cols}, as);
  }
  if (detail::has_learned_baseline(l)) {
    const auto v = l.baseline().values();
    out.add(std::string(prefix) + "baseline.parameters", std::span<const T>(v), {v.size()}, as);
  }
  if (l.strategy().strategy == strategy::soft_moe)
    detail::add_slots(out, l.soft_moe().layout(), l.soft_moe().values(), std::string(prefix) + "soft_moe.", as);
  if (l.strategy().strategy == strategy::cluster) {
    const auto c = l.cluster_centres();
    out.add(std::string(prefix) + "clusters", std::span<const T>(c.data, c.rows * c.cols), {c.rows, c.cols}, as);
  }
  out.metadata(detail::training_steps_key(prefix), std::to_string(l.training_steps()));
  out.metadata(detail::architecture_key(prefix), l.describe().str());
}

// ---- loading from an open file (several banks, routers or layers in one file) ----

/// Loads the bank from `file` (see the naming scheme above); all or nothing.
template <class Expert, std::size_t N>
void load(const safetensors_file& file, expert_bank<Expert, N>& bank, std::string_view prefix = "",
          const name_map& map = {}) {
  detail::commit(detail::stage(file, bank, prefix, map));
}

/// Loads the router from `file`; all or nothing.
template <class T>
void load(const safetensors_file& file, router<T>& r, std::string_view prefix = "", const name_map& map = {}) {
  detail::commit(detail::stage(file, r, prefix, map));
}

/// Loads the layer's tensors (those add() writes for its strategy) from `file`; all or nothing.
/// Refuses a file whose recorded architecture differs from the layer's (io_error naming each
/// difference) unless options.parameters_only. A layer in checked mode (check_finite) refuses
/// non-finite values, naming the tensor.
template <class Expert, std::size_t N, class Backend>
void load(const safetensors_file& file, layer<Expert, N, Backend>& l, std::string_view prefix = "",
          const name_map& map = {}, const load_options& options = {}) {
  using T = typename Expert::value_type;
  if (!options.parameters_only) detail::check_architecture(file, std::as_const(l), prefix);
  const bool finite = l.options().check_finite;
  std::vector<detail::staged_values<T>> staged;
  staged.push_back(detail::stage(file, l.bank(), prefix, map, finite));
  if (l.uses_router()) staged.push_back(detail::stage(file, l.router(), prefix, map, finite));
  // one planner tensor: `name` of `shape` into `to`
  auto stage_tensor = [&](const char* name, std::vector<std::size_t> shape, std::span<T> to, const char* needed_by) {
    detail::staged_values<T> s{to, std::vector<T>(to.size())};
    detail::read_checked(file, std::string(prefix) + name, map, shape, needed_by, std::span<T>(s.values), finite);
    staged.push_back(std::move(s));
  };
  if (l.strategy().strategy == strategy::latent_skills) {
    auto logits = l.skills().logits();
    stage_tensor("skills.logits", {logits.rows, logits.cols}, {logits.data, logits.rows * logits.cols},
                 "the latent skills");
  }
  if (detail::has_learned_baseline(l)) {
    auto v = l.baseline().values();
    stage_tensor("baseline.parameters", {v.size()}, v, "the REINFORCE baseline");
  }
  if (l.strategy().strategy == strategy::soft_moe)
    staged.push_back(detail::stage_slots(file, l.soft_moe().layout(), l.soft_moe().values(),
                                         std::string(prefix) + "soft_moe.", map, "Soft MoE", finite));
  if (l.strategy().strategy == strategy::cluster) {
    auto c = l.cluster_centres();
    stage_tensor("clusters", {c.rows, c.cols}, {c.data, c.rows * c.cols}, "the cluster centres");
  }
  const auto steps = detail::read_training_steps(file, prefix);
  for (const auto& s : staged) detail::commit(s);
  if (steps) l.set_training_steps(*steps);
  l.invalidate_cache();
}

// ---- from tensors held in memory ----

/// Tensors by name, built in memory, for making a layer (or bank, or router) from values that
/// come from elsewhere (another framework's arrays, a conversion script): load() reads them
/// under the checkpoint names above, with the same checks (every tensor present, of exactly
/// its shape) and the same all-or-nothing commit, so no value drawn by the constructor is
/// left behind unnoticed. Values are copied; add() throws value_error as
/// safetensors_writer::add does (a duplicate name, a shape that does not match the values).
///
/// Example (a layer of 8 adapter<float>{768, 64} experts under the default router):
/// ```
/// smear::named_tensors<float> t;
/// t.add("experts.down.weight", down, {8, 768, 64}).add("experts.down.bias", down_b, {8, 64})
///  .add("experts.up.weight", up, {8, 64, 768})
///  .add("router.layer_norm.weight", g, {768}).add("router.layer_norm.bias", b, {768})
///  .add("router.weight", w, {8, 768}).add("router.bias", w_b, {8});
/// smear::load(t, block);
/// ```
template <class T>
  requires std::is_floating_point_v<T>
class named_tensors {
 public:
  named_tensors& add(std::string name, std::span<const T> values, std::vector<std::size_t> shape) {
    writer_.add(std::move(name), values, std::move(shape));
    return *this;
  }
  /// Them as a safetensors file held in memory (what load() reads).
  safetensors_file file() const { return safetensors_file::parse(writer_.serialize(), "<named tensors>"); }

 private:
  safetensors_writer writer_;
};

/// Loads the layer, bank or router from named tensors (see named_tensors); all or nothing.
template <class T, class Object, class... Rest>
void load(const named_tensors<T>& tensors, Object& object, std::string_view prefix = "", const Rest&... rest) {
  load(tensors.file(), object, prefix, rest...);
}

// ---- one object per file ----

namespace detail {
template <class Object>
void save_one(const std::filesystem::path& path, const Object& object, std::string_view prefix,
              const save_options& options) {
  safetensors_writer out;
  add_metadata(out, options);
  out.set_narrowing(options.narrowing);
  add(out, object, prefix, options.dtype);
  if (out.saturated() > 0) out.metadata("smear.saturated", std::to_string(out.saturated()));
  out.save(path);
}
}  // namespace detail

/// Saves the layer as the safetensors file `path`, atomically (see safetensors_writer::save).
/// `__metadata__` gets "format": "pt" (so PyTorch's `safetensors.torch.load_file` accepts it),
/// "smear.version" and options.metadata.
///
/// Example: `smear::save("block.safetensors", block, "block.0.");`
template <class Expert, std::size_t N, class Backend>
void save(const std::filesystem::path& path, const layer<Expert, N, Backend>& l, std::string_view prefix = "",
          const save_options& options = {}) {
  detail::save_one(path, l, prefix, options);
}

/// Saves the bank as the safetensors file `path`, atomically.
template <class Expert, std::size_t N>
void save(const std::filesystem::path& path, const expert_bank<Expert, N>& bank, std::string_view prefix = "",
          const save_options& options = {}) {
  detail::save_one(path, bank, prefix, options);
}

/// Saves the router as the safetensors file `path`, atomically.
template <class T>
void save(const std::filesystem::path& path, const router<T>& r, std::string_view prefix = "",
          const save_options& options = {}) {
  detail::save_one(path, r, prefix, options);
}

/// Loads the layer from the safetensors file `path`; all or nothing.
///
/// Example:
/// ```
/// smear::load("block.safetensors", block, "block.0.");
/// // a file whose experts are called "adapters.<slot>":
/// smear::load("other.safetensors", block, "", [](std::string_view n) {
///   std::string s(n);
///   return s.starts_with("experts.") ? "adapters." + s.substr(8) : s;
/// });
/// ```
template <class Expert, std::size_t N, class Backend>
void load(const std::filesystem::path& path, layer<Expert, N, Backend>& l, std::string_view prefix = "",
          const name_map& map = {}, const load_options& options = {}) {
  load(safetensors_file::open(path), l, prefix, map, options);
}

/// Loads the bank from the safetensors file `path`; all or nothing.
template <class Expert, std::size_t N>
void load(const std::filesystem::path& path, expert_bank<Expert, N>& bank, std::string_view prefix = "",
          const name_map& map = {}) {
  load(safetensors_file::open(path), bank, prefix, map);
}

/// Loads the router from the safetensors file `path`; all or nothing.
template <class T>
void load(const std::filesystem::path& path, router<T>& r, std::string_view prefix = "", const name_map& map = {}) {
  load(safetensors_file::open(path), r, prefix, map);
}

}  // namespace smear
