#pragma once
/// \file block_impl.hpp
/// python::block over a smear::layer<Expert, N>, and the choice of N at run time. Included by
/// the blocks_<expert>.cpp files only.

#include <array>
#include <filesystem>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "block.hpp"

namespace smear::python {

/// The values of `a` as a T array of `rank` axes, C-contiguous; value_error otherwise.
template <class T>
T* checked_data(py::array& a, std::size_t rank, const char* what) {
  if (!py::dtype::of<T>().is(a.dtype()))
    throw value_error(detail::message(what, " has dtype ", std::string(py::str(a.dtype())), ", the block's is ",
                                      std::string(py::str(py::dtype::of<T>()))));
  if (static_cast<std::size_t>(a.ndim()) != rank)
    throw shape_error(detail::message(what, " has ", a.ndim(), " axes, expected ", rank));
  if (!(a.flags() & py::array::c_style))
    throw value_error(detail::message(what, " is not C-contiguous (call .contiguous() first)"));
  if (!a.writeable()) throw value_error(detail::message(what, " is read-only"));
  return static_cast<T*>(a.mutable_data());
}

/// The optional int32 vector `o` of `count` entries copied into `out`; empty for None.
inline std::span<const std::int32_t> copied_ints(py::object o, std::size_t count, const char* what,
                                                 std::vector<std::int32_t>& out) {
  out.clear();
  if (o.is_none()) return {};
  auto a = py::cast<py::array>(o);
  const std::int32_t* v = checked_data<std::int32_t>(a, 1, what);
  if (static_cast<std::size_t>(a.shape(0)) != count)
    throw shape_error(detail::message(what, " has ", a.shape(0), " entries, expected B = ", count));
  out.assign(v, v + count);
  return out;
}

template <class Expert, std::size_t N>
class block_of final : public block {
  using T = typename Expert::value_type;

 public:
  block_of(Expert prototype, const block_spec& spec) : layer_(std::move(prototype), spec.layer, spec.seed) {}

  void forward(py::array x, py::object lengths, py::object tags, py::array y) override {
    const T* xd = checked_data<T>(x, 3, "x");
    T* yd = checked_data<T>(y, 3, "y");
    const auto B = static_cast<std::size_t>(x.shape(0)), L = static_cast<std::size_t>(x.shape(1)),
               d = static_cast<std::size_t>(x.shape(2));
    if (static_cast<std::size_t>(y.shape(0)) != B || static_cast<std::size_t>(y.shape(1)) != L ||
        static_cast<std::size_t>(y.shape(2)) != layer_.output_dim())
      throw shape_error(detail::message("y is [", y.shape(0), ", ", y.shape(1), ", ", y.shape(2), "], expected [B, L, ",
                                        "d_out] = ", detail::shape(B, L, layer_.output_dim())));
    const auto len = copied_ints(lengths, B, "lengths", lengths_);
    const auto tg = copied_ints(tags, B, "tags", tags_);
    held_ = x;  // the layer reads x again in backward()
    py::gil_scoped_release unlocked;
    layer_.forward(make_tokens(xd, B, L, d, len), {yd, B * L * layer_.output_dim()}, route_inputs{.tags = tg});
  }

  void backward(py::array dy, py::array dx, py::object losses) override {
    const T* dyd = checked_data<T>(dy, 3, "dy");
    T* dxd = checked_data<T>(dx, 3, "dx");
    std::span<const T> l;
    py::array la;
    if (!losses.is_none()) {
      la = py::cast<py::array>(losses);
      l = {checked_data<T>(la, 1, "example_losses"), static_cast<std::size_t>(la.shape(0))};
    }
    py::gil_scoped_release unlocked;
    layer_.backward({dyd, static_cast<std::size_t>(dy.size())}, {dxd, static_cast<std::size_t>(dx.size())}, l);
  }

  py::list parameters(py::object owner) override {
    py::list out;
    for (auto& p : layer_.parameters()) {
      std::vector<py::ssize_t> strides(p.shape.size());
      py::ssize_t stride = sizeof(T);
      for (std::size_t i = p.shape.size(); i-- > 0;) {
        strides[i] = stride;
        stride *= static_cast<py::ssize_t>(p.shape[i]);
      }
      py::array value(py::dtype::of<T>(), p.shape, strides, p.value.data(), owner);
      py::array grad(py::dtype::of<T>(), p.shape, strides, p.grad.data(), owner);
      out.append(py::make_tuple(p.name, value, grad, p.decay));
    }
    return out;
  }

  py::list expert_layout() const override {
    py::list out;
    for (const auto& s : layer_.bank().layout()) out.append(py::make_tuple(s.name, s.offset, py::tuple(py::cast(s.shape))));
    return out;
  }

  py::array routing() const override { return copy(layer_.routing()); }
  py::array choices() const override { return copy(layer_.choices()); }

  py::dict describe() const override {
    py::dict out;
    const description d = layer_.describe();  // entries() refers into it
    for (const auto& [key, value] : d.entries()) out[py::str(key)] = value;
    return out;
  }

  void train(bool on) override { layer_.train(on); }
  bool training() const override { return layer_.training(); }
  void reseed(std::uint64_t seed) override { layer_.reseed(seed); }
  void invalidate_cache() override { layer_.invalidate_cache(); }
  std::size_t cache_builds() const override { return layer_.cache_builds(); }
  void zero_grad() override { layer_.zero_grad(); }
  double auxiliary_loss() const override { return static_cast<double>(layer_.auxiliary_loss()); }
  bool needs_losses() const override {
    const auto& s = layer_.strategy();
    return layer_.training() && s.strategy == strategy::top_k && s.estimator == estimator::reinforce;
  }
  std::size_t input_dim() const override { return layer_.input_dim(); }
  std::size_t output_dim() const override { return layer_.output_dim(); }
  std::size_t experts() const override { return N; }
  std::string dtype() const override { return sizeof(T) == 4 ? "float32" : "float64"; }
  std::uint64_t training_steps() const override { return layer_.training_steps(); }

  std::unique_ptr<optimizer> adamw(const adamw_options& options) override {
    struct adamw_of final : optimizer {
      explicit adamw_of(smear::adamw<T> o) : opt(std::move(o)) {}
      void step() override { opt.step(); }
      std::size_t steps() const override { return opt.steps(); }
      smear::adamw<T> opt;
    };
    return std::make_unique<adamw_of>(smear::adamw<T>{layer_.parameters(), options});
  }

  void load_peft(const std::vector<std::string>& dirs, const std::string& module) override {
    if constexpr (std::is_same_v<Expert, lora<T>>) {
      const std::vector<std::filesystem::path> paths(dirs.begin(), dirs.end());
      smear::load_peft(layer_, paths, module);
    } else {
      throw value_error("load_peft: PEFT LoRA adapters load into a block of lora experts");
    }
  }
  void save_peft(const std::vector<std::string>& dirs, const std::string& module,
                 const std::string& base_model) const override {
    if constexpr (std::is_same_v<Expert, lora<T>>) {
      const std::vector<std::filesystem::path> paths(dirs.begin(), dirs.end());
      smear::save_peft(layer_, paths, module, {.base_model = base_model});
    } else {
      throw value_error("save_peft: only a block of lora experts saves PEFT LoRA adapters");
    }
  }

 private:
  template <class V>
  static py::array copy(matrix_ref<const V> m) {
    py::array_t<V> out({m.rows, m.cols});
    std::copy_n(m.data, m.rows * m.cols, out.mutable_data());
    return out;
  }

  layer<Expert, N> layer_;
  py::object held_ = py::none();
  std::vector<std::int32_t> lengths_, tags_;
};

/// A block of `Expert` with N = spec.experts, one of compiled_counts; value_error otherwise.
template <class Expert>
std::unique_ptr<block> make_block(Expert prototype, const block_spec& spec) {
  std::unique_ptr<block> out;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    ((spec.experts == compiled_counts[I]
          ? void(out = std::make_unique<block_of<Expert, compiled_counts[I]>>(std::move(prototype), spec))
          : void()),
     ...);
  }(std::make_index_sequence<std::size(compiled_counts)>{});
  if (!out) {
    std::string counts;
    for (std::size_t n : compiled_counts) counts += (counts.empty() ? "" : ", ") + std::to_string(n);
    throw value_error(detail::message("experts = ", spec.experts, " is not compiled into the module; it has N = ",
                                      counts, " (python/src/block.hpp: compiled_counts)"));
  }
  return out;
}

/// The block's element type from spec.dtype, as `f.template operator()<T>()`.
template <class F>
std::unique_ptr<block> with_dtype(const block_spec& spec, F&& f) {
  if (spec.dtype == "float32") return f.template operator()<float>();
  if (spec.dtype == "float64") return f.template operator()<double>();
  throw value_error(detail::message("dtype must be float32 or float64, got '", spec.dtype, "'"));
}

}  // namespace smear::python
