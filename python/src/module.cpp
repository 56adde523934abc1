/// \file module.cpp
/// smear._smear: the routing block for Python (python/smear/__init__.py wraps it in a
/// torch.nn.Module). Options arrive by name; smear's exceptions become Python exceptions.

#include <functional>
#include <map>
#include <string>

#include "block.hpp"

namespace smear::python {
namespace {

template <class Enum, std::size_t K>
Enum named(const py::handle& v, const char* key, const std::pair<const char*, Enum> (&names)[K]) {
  const auto s = py::cast<std::string>(v);
  std::string known;
  for (const auto& [name, e] : names) {
    if (s == name) return e;
    known += (known.empty() ? "" : ", ") + std::string(name);
  }
  throw value_error(detail::message("option ", key, " = '", s, "'; known: ", known));
}

using setter = std::function<void(block_spec&, const py::handle&)>;

/// Every option the module takes by name, and where it goes.
const std::map<std::string, setter>& option_table() {
  static const std::map<std::string, setter> table = [] {
    std::map<std::string, setter> t;
    auto num = [](const py::handle& v) { return py::cast<double>(v); };
    auto count = [](const py::handle& v) { return py::cast<std::size_t>(v); };
    auto flag = [](const py::handle& v) { return py::cast<bool>(v); };
    // the strategy and its options (smear/routing/strategy.hpp)
    t["k"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.k = count(v); };
    t["tasks"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.tasks = count(v); };
    t["hash_seed"] = [](block_spec& s, const py::handle& v) { s.layer.routing.hash_seed = py::cast<std::uint64_t>(v); };
    t["soft_slots"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.soft_slots = count(v); };
    t["switch_renormalize"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.switch_renormalize = flag(v); };
    t["dselect_gamma"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.dselect_gamma = num(v); };
    t["dselect_entropy"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.dselect_entropy = num(v); };
    t["dselect_unused_penalty"] = [=](block_spec& s, const py::handle& v) {
      s.layer.routing.dselect_unused_penalty = num(v);
    };
    t["baseline"] = [](block_spec& s, const py::handle& v) {
      s.layer.routing.baseline = named(v, "baseline", {std::pair{"moving_average", baseline::moving_average},
                                                       std::pair{"learned", baseline::learned}});
    };
    t["baseline_momentum"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.baseline_momentum = num(v); };
    t["baseline_hidden"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.baseline_hidden = count(v); };
    t["value_loss"] = [](block_spec& s, const py::handle& v) {
      s.layer.routing.value_loss =
          named(v, "value_loss", {std::pair{"squared", value_loss::squared}, std::pair{"huber", value_loss::huber}});
    };
    t["huber_delta"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.huber_delta = num(v); };
    t["entropy_bonus"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.entropy_bonus = num(v); };
    t["policy_weight"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.policy_weight = num(v); };
    t["skills_temperature"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.skills_temperature = num(v); };
    t["cluster_momentum"] = [=](block_spec& s, const py::handle& v) { s.layer.routing.cluster_momentum = num(v); };
    t["gumbel_temperature"] = [](block_spec& s, const py::handle& v) {
      // (initial, minimum, rate, every)
      const auto g = py::cast<std::tuple<double, double, double, std::uint64_t>>(v);
      s.layer.routing.gumbel_temperature = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g)};
    };
    // the router (smear/routing/router.hpp)
    t["pool"] = [](block_spec& s, const py::handle& v) {
      s.layer.router.pool =
          named(v, "pool", {std::pair{"masked_mean", pooling::masked_mean}, std::pair{"mean", pooling::mean}});
    };
    t["layer_norm"] = [=](block_spec& s, const py::handle& v) { s.layer.router.layer_norm = flag(v); };
    t["temperature"] = [=](block_spec& s, const py::handle& v) { s.layer.router.temperature = num(v); };
    t["detach_input"] = [=](block_spec& s, const py::handle& v) { s.layer.router.detach_input = flag(v); };
    t["expert_dropout"] = [=](block_spec& s, const py::handle& v) { s.layer.router.expert_dropout = num(v); };
    t["router_init_std"] = [=](block_spec& s, const py::handle& v) { s.layer.router.init_std = num(v); };
    t["layer_norm_eps"] = [=](block_spec& s, const py::handle& v) { s.layer.router.layer_norm_eps = num(v); };
    t["normalize_weights"] = [=](block_spec& s, const py::handle& v) { s.layer.router.normalize_weights = flag(v); };
    t["router_bias"] = [=](block_spec& s, const py::handle& v) { s.layer.router.bias = flag(v); };
    t["segment_length"] = [=](block_spec& s, const py::handle& v) { s.layer.router.segment_length = count(v); };
    // the layer (smear/layer_options.hpp)
    t["residual"] = [=](block_spec& s, const py::handle& v) { s.layer.residual = flag(v); };
    t["check_finite"] = [=](block_spec& s, const py::handle& v) { s.layer.check_finite = flag(v); };
    t["threads"] = [=](block_spec& s, const py::handle& v) { s.layer.threads = count(v); };
    // the experts (smear/experts/)
    t["activation"] = [](block_spec& s, const py::handle& v) {
      s.adapter.act = named(v, "activation", {std::pair{"silu", activation::silu}, std::pair{"relu", activation::relu},
                                              std::pair{"gelu", activation::gelu},
                                              std::pair{"identity", activation::identity}});
    };
    t["up_bias"] = [=](block_spec& s, const py::handle& v) { s.adapter.up_bias = flag(v); };
    t["init_std"] = [=](block_spec& s, const py::handle& v) {
      s.adapter.init_std = s.lora.init_std = s.linear.init_std = num(v);
    };
    t["alpha"] = [=](block_spec& s, const py::handle& v) { s.lora.alpha = num(v); };
    t["bias"] = [=](block_spec& s, const py::handle& v) { s.linear.bias = flag(v); };
    return t;
  }();
  return table;
}

/// The block that `expert`, the sizes and the named options describe. `preset` ("" or
/// "official" / "official_resnet": smear::official_options) is applied before the options.
std::unique_ptr<block> make(const std::string& expert, const std::string& dtype, std::size_t experts, std::size_t in,
                            std::size_t out, std::size_t width, const std::string& strategy, const std::string& preset,
                            std::uint64_t seed, py::object frozen_weight, py::object frozen_bias,
                            const py::dict& options) {
  block_spec s;
  s.expert = expert;
  s.dtype = dtype;
  s.experts = experts;
  s.in = in;
  s.out = out;
  s.width = width;
  s.seed = seed;
  s.frozen_weight = std::move(frozen_weight);
  s.frozen_bias = std::move(frozen_bias);
  s.layer.routing = parse_strategy(strategy);
  if (preset == "official") s.layer = official_options(s.layer, official_setup::t5);
  else if (preset == "official_resnet") s.layer = official_options(s.layer, official_setup::resnet);
  else if (!preset.empty())
    throw value_error(detail::message("preset '", preset, "'; known: official, official_resnet"));
  const auto& table = option_table();
  for (const auto& [key, value] : options) {
    const auto name = py::cast<std::string>(key);
    const auto it = table.find(name);
    if (it == table.end()) {
      std::string known;
      for (const auto& [k, unused] : table) known += (known.empty() ? "" : ", ") + k;
      throw value_error(detail::message("unknown option '", name, "'; known: ", known));
    }
    try {
      it->second(s, value);
    } catch (const py::cast_error&) {
      throw value_error(detail::message("option ", name, " = ", std::string(py::repr(value)), " has the wrong type"));
    }
  }
  if (expert == "adapter") return make_adapter_block(s);
  if (expert == "lora") return make_lora_block(s);
  if (expert == "linear") return make_linear_block(s);
  throw value_error(detail::message("expert '", expert, "'; known: adapter, lora, linear"));
}

}  // namespace
}  // namespace smear::python

PYBIND11_MODULE(_smear, m) {
  namespace py = pybind11;
  using smear::python::block;
  m.doc() = "smear's routing block (smear::layer on the cpu backend) for Python; see smear.Block";

  // smear's exceptions (smear/error.hpp), under Python's matching built-in ones
  py::register_exception<smear::shape_error>(m, "ShapeError", PyExc_ValueError);
  py::register_exception<smear::value_error>(m, "InvalidValueError", PyExc_ValueError);
  py::register_exception<smear::numeric_error>(m, "NumericError", PyExc_ArithmeticError);
  py::register_exception<smear::state_error>(m, "StateError", PyExc_RuntimeError);
  py::register_exception<smear::io_error>(m, "IoError", PyExc_OSError);

  py::list counts;
  for (std::size_t n : smear::python::compiled_counts) counts.append(n);
  m.attr("compiled_counts") = counts;

  py::class_<block>(m, "Block")
      .def(py::init(&smear::python::make), py::arg("expert"), py::arg("dtype"), py::arg("experts"), py::arg("in_dim"),
           py::arg("out_dim"), py::arg("width"), py::arg("strategy"), py::arg("preset"), py::arg("seed"),
           py::arg("frozen_weight"), py::arg("frozen_bias"), py::arg("options"))
      .def("forward", &block::forward, py::arg("x"), py::arg("lengths"), py::arg("tags"), py::arg("y"))
      .def("backward", &block::backward, py::arg("dy"), py::arg("dx"), py::arg("losses"))
      .def("parameters", [](py::object self) { return self.cast<block&>().parameters(self); })
      .def("expert_layout", &block::expert_layout)
      .def("routing", &block::routing)
      .def("choices", &block::choices)
      .def("describe", &block::describe)
      .def("train", &block::train, py::arg("on"))
      .def_property_readonly("training", &block::training)
      .def("reseed", &block::reseed, py::arg("seed"))
      .def("invalidate_cache", &block::invalidate_cache)
      .def("zero_grad", &block::zero_grad)
      .def_property_readonly("auxiliary_loss", &block::auxiliary_loss)
      .def_property_readonly("needs_losses", &block::needs_losses)
      .def_property_readonly("input_dim", &block::input_dim)
      .def_property_readonly("output_dim", &block::output_dim)
      .def_property_readonly("experts", &block::experts)
      .def_property_readonly("dtype", &block::dtype)
      .def_property_readonly("training_steps", &block::training_steps);
}
