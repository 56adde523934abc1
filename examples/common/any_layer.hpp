#pragma once
/// \file any_layer.hpp
/// A routing block whose expert type and expert count are chosen at run time: smear::layer's N
/// is a compile-time constant, so `make_layer<1, 6, 12>(n, ...)` builds the smear::layer of
/// the listed size that equals n, and any_layer runs it behind one interface. The examples'
/// networks hold any_layers, so one network type serves every strategy and N.

#include <smear/smear.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>

namespace examples {

/// A smear::layer<Expert, N> of values T, any Expert and N: forward, backward, parameters,
/// training mode, and the routing distribution of the last forward.
template <class T>
class any_layer {
 public:
  any_layer() = default;

  /// A smear::layer<Expert, N> built from (prototype, options, seed).
  template <class Expert, std::size_t N>
  static any_layer make(Expert prototype, const smear::layer_options& options, std::uint64_t seed) {
    any_layer out;
    out.self_ = std::make_unique<holder<Expert, N>>(std::move(prototype), options, seed);
    return out;
  }

  explicit operator bool() const noexcept { return self_ != nullptr; }

  void forward(smear::tokens<const T> x, std::span<T> y, smear::route_inputs in = {}) { self_->forward(x, y, in); }
  void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses = {}) {
    self_->backward(dy, dx, example_losses);
  }
  smear::parameter_list<T> parameters() { return self_->parameters(); }
  void zero_grad() { self_->zero_grad(); }
  void train(bool on) { self_->train(on); }
  /// See smear::layer::set_replicas (data-parallel training).
  void set_replicas(smear::replica_group<T>* group) { self_->set_replicas(group); }
  std::size_t experts() const { return self_->experts(); }
  /// The distribution over experts of the last forward, [B, experts()].
  smear::matrix_ref<const T> routing() const { return self_->routing(); }

 private:
  struct base {
    virtual ~base() = default;
    virtual void forward(smear::tokens<const T> x, std::span<T> y, smear::route_inputs in) = 0;
    virtual void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses) = 0;
    virtual smear::parameter_list<T> parameters() = 0;
    virtual void zero_grad() = 0;
    virtual void train(bool on) = 0;
    virtual void set_replicas(smear::replica_group<T>* group) = 0;
    virtual std::size_t experts() const = 0;
    virtual smear::matrix_ref<const T> routing() const = 0;
  };

  template <class Expert, std::size_t N>
  struct holder final : base {
    holder(Expert prototype, const smear::layer_options& options, std::uint64_t seed)
        : layer(std::move(prototype), options, seed) {}
    void forward(smear::tokens<const T> x, std::span<T> y, smear::route_inputs in) override { layer.forward(x, y, in); }
    void backward(std::span<const T> dy, std::span<T> dx, std::span<const T> example_losses) override {
      layer.backward(dy, dx, example_losses);
    }
    smear::parameter_list<T> parameters() override { return layer.parameters(); }
    void zero_grad() override { layer.zero_grad(); }
    void train(bool on) override { layer.train(on); }
    void set_replicas(smear::replica_group<T>* group) override { layer.set_replicas(group); }
    std::size_t experts() const override { return N; }
    smear::matrix_ref<const T> routing() const override { return layer.routing(); }

    smear::layer<Expert, N> layer;
  };

  std::unique_ptr<base> self_;
};

/// A routing block of `n` experts shaped like `prototype`, n one of the compiled sizes `Ns`.
/// Throws value_error naming the sizes for another n.
template <std::size_t... Ns, class Expert>
any_layer<typename Expert::value_type> make_layer(std::size_t n, Expert prototype, const smear::layer_options& options,
                                                   std::uint64_t seed) {
  static_assert(sizeof...(Ns) > 0, "make_layer: list the expert counts to compile");
  using layer_type = any_layer<typename Expert::value_type>;
  layer_type out;
  auto build = [&]<std::size_t N>() {
    if (n == N) out = layer_type::template make<Expert, N>(std::move(prototype), options, seed);
  };
  (build.template operator()<Ns>(), ...);
  if (!out) {
    std::string sizes;
    ((sizes += (sizes.empty() ? "" : ", ") + std::to_string(Ns)), ...);
    throw smear::value_error("make_layer: " + std::to_string(n) + " experts; the compiled sizes are " + sizes);
  }
  return out;
}

}  // namespace examples
