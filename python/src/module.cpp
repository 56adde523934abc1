/// \file module.cpp
/// smear._smear: the routing block for Python (python/smear/__init__.py wraps it in a
/// torch.nn.Module). Options arrive by name; smear's exceptions become Python exceptions.

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "block.hpp"

namespace smear::python {
namespace {

using setter = std::function<void(block_spec&, const py::handle&)>;

/// A setter of `member` of the options struct `part(spec)` returns, the value cast to its type.
template <class Part, class Struct, class V>
setter field(Part part, V Struct::*member) {
  return [=](block_spec& s, const py::handle& v) { part(s).*member = py::cast<V>(v); };
}
/// The same for an enum member, the value one of `names` (value_error listing them otherwise).
template <class Part, class Struct, class Enum>
setter field(Part part, Enum Struct::*member, std::vector<std::pair<std::string, Enum>> names) {
  return [=](block_spec& s, const py::handle& v) {
    const auto name = py::cast<std::string>(v);
    std::string known;
    for (const auto& [n, e] : names) {
      if (n == name) {
        part(s).*member = e;
        return;
      }
      known += (known.empty() ? "" : ", ") + n;
    }
    throw value_error(detail::message("known: ", known));
  };
}

/// Every option the module takes by name, and where it goes.
const std::map<std::string, setter>& option_table() {
  static const std::map<std::string, setter> table = [] {
    auto routing = [](block_spec& s) -> strategy_options& { return s.layer.routing; };  // smear/routing/strategy.hpp
    auto router = [](block_spec& s) -> router_options& { return s.layer.router; };       // smear/routing/router.hpp
    auto layer = [](block_spec& s) -> layer_options& { return s.layer; };                // smear/layer_options.hpp
    auto adapter = [](block_spec& s) -> adapter_options& { return s.adapter; };          // smear/experts/
    auto lora = [](block_spec& s) -> lora_options& { return s.lora; };
    auto linear = [](block_spec& s) -> linear_options& { return s.linear; };
    using so = strategy_options;
    using ro = router_options;
    std::map<std::string, setter> t{
        {"k", field(routing, &so::k)},
        {"tasks", field(routing, &so::tasks)},
        {"hash_seed", field(routing, &so::hash_seed)},
        {"soft_slots", field(routing, &so::soft_slots)},
        {"switch_renormalize", field(routing, &so::switch_renormalize)},
        {"dselect_gamma", field(routing, &so::dselect_gamma)},
        {"dselect_entropy", field(routing, &so::dselect_entropy)},
        {"dselect_unused_penalty", field(routing, &so::dselect_unused_penalty)},
        {"baseline", field(routing, &so::baseline,
                           {{"moving_average", baseline::moving_average}, {"learned", baseline::learned}})},
        {"baseline_momentum", field(routing, &so::baseline_momentum)},
        {"baseline_hidden", field(routing, &so::baseline_hidden)},
        {"value_loss", field(routing, &so::value_loss, {{"squared", value_loss::squared}, {"huber", value_loss::huber}})},
        {"huber_delta", field(routing, &so::huber_delta)},
        {"entropy_bonus", field(routing, &so::entropy_bonus)},
        {"policy_weight", field(routing, &so::policy_weight)},
        {"skills_temperature", field(routing, &so::skills_temperature)},
        {"cluster_momentum", field(routing, &so::cluster_momentum)},
        {"pool", field(router, &ro::pool, {{"masked_mean", pooling::masked_mean}, {"mean", pooling::mean}})},
        {"layer_norm", field(router, &ro::layer_norm)},
        {"temperature", field(router, &ro::temperature)},
        {"detach_input", field(router, &ro::detach_input)},
        {"expert_dropout", field(router, &ro::expert_dropout)},
        {"router_init_std", field(router, &ro::init_std)},
        {"layer_norm_eps", field(router, &ro::layer_norm_eps)},
        {"normalize_weights", field(router, &ro::normalize_weights)},
        {"router_bias", field(router, &ro::bias)},
        {"segment_length", field(router, &ro::segment_length)},
        {"residual", field(layer, &layer_options::residual)},
        {"check_finite", field(layer, &layer_options::check_finite)},
        {"threads", field(layer, &layer_options::threads)},
        {"activation", field(adapter, &adapter_options::act,
                             {{"silu", activation::silu}, {"relu", activation::relu}, {"gelu", activation::gelu},
                              {"identity", activation::identity}})},
        {"up_bias", field(adapter, &adapter_options::up_bias)},
        {"alpha", field(lora, &lora_options::alpha)},
        {"bias", field(linear, &linear_options::bias)},
    };
    t["gumbel_temperature"] = [](block_spec& s, const py::handle& v) {  // (initial, minimum, rate, every)
      const auto g = py::cast<std::tuple<double, double, double, std::uint64_t>>(v);
      s.layer.routing.gumbel_temperature = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g)};
    };
    t["init_std"] = [](block_spec& s, const py::handle& v) {  // whichever expert the block has
      s.adapter.init_std = s.lora.init_std = s.linear.init_std = py::cast<double>(v);
    };
    return t;
  }();
  return table;
}

/// The block that `expert`, the sizes and the named options describe. `preset` ("" or
/// "official" / "official_resnet": smear::official_options; "plain": smear::plain_options and
/// plain_adapter_options) is applied before the options.
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
  if (preset == "official") {
    s.layer = official_options(s.layer, official_setup::t5);
  } else if (preset == "official_resnet") {
    s.layer = official_options(s.layer, official_setup::resnet);
  } else if (preset == "plain") {
    s.layer = plain_options(s.layer);
    s.adapter = plain_adapter_options;
  } else if (!preset.empty()) {
    throw value_error(detail::message("preset '", preset, "'; known: official, official_resnet, plain"));
  }
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
    } catch (const value_error& e) {
      throw value_error(detail::message("option ", name, " = ", std::string(py::repr(value)), "; ", e.what()));
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
      .def_property_readonly("cache_builds", &block::cache_builds)
      .def("zero_grad", &block::zero_grad)
      .def_property_readonly("auxiliary_loss", &block::auxiliary_loss)
      .def_property_readonly("needs_losses", &block::needs_losses)
      .def_property_readonly("input_dim", &block::input_dim)
      .def_property_readonly("output_dim", &block::output_dim)
      .def_property_readonly("experts", &block::experts)
      .def_property_readonly("dtype", &block::dtype)
      .def_property_readonly("training_steps", &block::training_steps)
      .def(
          "adamw",
          [](block& b, double lr, double beta1, double beta2, double eps, double weight_decay) {
            return b.adamw({.lr = lr, .beta1 = beta1, .beta2 = beta2, .eps = eps, .weight_decay = weight_decay});
          },
          py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
          py::keep_alive<0, 1>())
      .def("load_peft", &block::load_peft, py::arg("dirs"), py::arg("module"))
      .def("save_peft", &block::save_peft, py::arg("dirs"), py::arg("module"), py::arg("base_model"));

  py::class_<smear::python::optimizer>(m, "AdamW")
      .def("step", &smear::python::optimizer::step, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("steps", &smear::python::optimizer::steps);

  // PEFT adapter files (smear/io/peft.hpp)
  m.def(
      "peft_config",
      [](const std::string& dir, const std::string& module) {
        const auto c = smear::read_peft_config(dir, module);
        py::dict out;
        out["rank"] = c.rank;
        out["lora_alpha"] = c.alpha;
        out["use_rslora"] = c.rslora;
        out["fan_in_fan_out"] = c.fan_in_fan_out;
        out["base_model"] = c.base_model;
        out["scaling"] = c.scaling();
        return out;
      },
      py::arg("dir"), py::arg("module"));
  m.def(
      "peft_base",
      [](const std::string& path, const std::string& module, bool fan_in_fan_out) {
        auto b = smear::read_peft_base<double>(std::filesystem::path(path), module, fan_in_fan_out);
        py::array_t<double> weight({b.in, b.out});  // smear's [in, out]
        std::copy(b.weight.begin(), b.weight.end(), weight.mutable_data());
        py::object bias = py::none();
        if (!b.bias.empty()) {
          py::array_t<double> v(b.out);
          std::copy(b.bias.begin(), b.bias.end(), v.mutable_data());
          bias = v;
        }
        return py::make_tuple(weight, bias);
      },
      py::arg("path"), py::arg("module"), py::arg("fan_in_fan_out"));
}
