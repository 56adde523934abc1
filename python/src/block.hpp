#pragma once
/// \file block.hpp
/// The Python module's view of a routing block: one interface over every compiled (expert, N,
/// dtype), so the module is one class whatever the block holds. Each expert type's blocks are
/// compiled in their own file (blocks_<expert>.cpp); module.cpp binds the interface.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <smear/io/peft.hpp>
#include <smear/smear.hpp>

namespace smear::python {

namespace py = pybind11;

/// The expert counts N the module is compiled for.
inline constexpr std::size_t compiled_counts[] = {1, 2, 4, 8, 16};

/// What a block is built from (module.cpp reads it from Python keywords).
struct block_spec {
  std::string expert;          ///< "adapter", "lora" or "linear"
  std::string dtype;           ///< "float32" or "float64"
  std::size_t experts = 0;     ///< N, one of compiled_counts
  std::size_t in = 0;          ///< d (adapter), in (lora, linear)
  std::size_t out = 0;         ///< out (lora, linear); the adapter's is d
  std::size_t width = 0;       ///< m (adapter), rank (lora)
  layer_options layer{};
  adapter_options adapter{};
  lora_options lora{};
  linear_options linear{};
  py::object frozen_weight = py::none();  ///< lora: W₀ [in, out] as a C-contiguous array, or None
  py::object frozen_bias = py::none();    ///< lora: b₀ [out], or None
  std::uint64_t seed = 0;
};

/// smear's AdamW (smear::adamw) over a block's parameters and their C++ gradient buffers.
class optimizer {
 public:
  virtual ~optimizer() = default;
  virtual void step() = 0;
  virtual std::size_t steps() const = 0;
};

/// A routing block as Python sees it. Arrays are numpy arrays of the block's dtype, C-contiguous
/// (anything else is refused with value_error); errors are smear's exceptions.
class block {
 public:
  virtual ~block() = default;

  /// y ← block(x): x [B, L, d_in], y [B, L, d_out]; lengths [B] (int32) and tags [B] (int32)
  /// may be None. x is held until the next forward (the layer reads it in backward()).
  virtual void forward(py::array x, py::object lengths, py::object tags, py::array y) = 0;
  /// dx ← ∂ℓ/∂x for the last forward and the gradients ← ∂ℓ/∂θ (accumulated); losses [B] or None.
  virtual void backward(py::array dy, py::array dx, py::object losses) = 0;
  /// Every trainable tensor as (name, value, gradient, decay): arrays that view the block's own
  /// storage and keep `owner` (the block's Python object) alive.
  virtual py::list parameters(py::object owner) = 0;
  /// The expert's slots as (name, offset, shape) within a row of "experts".
  virtual py::list expert_layout() const = 0;
  /// The routing distribution of the last forward, [B, N] (a copy), and the experts run, [B, k].
  virtual py::array routing() const = 0;
  virtual py::array choices() const = 0;
  virtual py::dict describe() const = 0;

  virtual void train(bool on) = 0;
  virtual bool training() const = 0;
  virtual void reseed(std::uint64_t seed) = 0;
  virtual void invalidate_cache() = 0;
  /// How many times the inference cache was (re)built (smear::layer::cache_builds()).
  virtual std::size_t cache_builds() const = 0;
  virtual void zero_grad() = 0;
  virtual double auxiliary_loss() const = 0;
  /// Whether backward() needs each example's loss (REINFORCE in training).
  virtual bool needs_losses() const = 0;
  virtual std::size_t input_dim() const = 0;
  virtual std::size_t output_dim() const = 0;
  virtual std::size_t experts() const = 0;
  virtual std::string dtype() const = 0;
  virtual std::uint64_t training_steps() const = 0;

  /// smear::adamw over parameters() (it reads their gradient buffers); the block must outlive it.
  virtual std::unique_ptr<optimizer> adamw(const adamw_options& options) = 0;
  /// smear::load_peft / save_peft of the experts (value_error unless they are LoRA experts).
  virtual void load_peft(const std::vector<std::string>& dirs, const std::string& module) = 0;
  virtual void save_peft(const std::vector<std::string>& dirs, const std::string& module,
                         const std::string& base_model) const = 0;
};

std::unique_ptr<block> make_adapter_block(const block_spec& spec);
std::unique_ptr<block> make_lora_block(const block_spec& spec);
std::unique_ptr<block> make_linear_block(const block_spec& spec);

}  // namespace smear::python
