#pragma once
/// \file cuda/layer.hpp
/// `smear::layer<Expert, N, smear::backend::cuda>`: the SMEAR block on an NVIDIA GPU, its
/// parameters, activations and workspaces in device memory, its work enqueued on a
/// caller-given stream (cuBLAS for the GEMMs, Thrust for the element-wise work). Needs a CUDA
/// compiler; include it through <smear/cuda.hpp>.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "smear/backend/cuda/context.hpp"
#include "smear/cuda/device_layer.hpp"
#include "smear/backend/tags.hpp"
#include "smear/layer_core.hpp"

namespace smear {

/// The SMEAR block run by the cuda backend. Same math, options, initialisation and errors as
/// the host layers; differences:
/// - x, y, dy and dx are device pointers (x.lengths stays on the host); work is asynchronous
///   on the layer's stream, so synchronise the stream before reading results on the host;
/// - bank() and router() are host mirrors: download() refreshes them from the device and
///   upload() sends changed values back; device_bank_values() etc. view the device copies;
/// - routing() and choices() of smear and the ensemble download [B, N] (they wait for the
///   stream);
/// - every strategy of smear::layer, planned by the same planner (smear/routing/): the small
///   per-example decisions (Gumbel samples, REINFORCE, DSelect-k's gates, switch) are made on the
///   host from the B×N logits and probabilities copied back, and skills() and baseline() live
///   on the host; set_task_routing() and the inference cache work as on the host.
///
/// Example:
/// ```
/// cudaStream_t s; cudaStreamCreate(&s);
/// smear::layer<smear::adapter<float>, 8, smear::backend::cuda> block{smear::adapter<float>{768, 24}, {}, 42, s};
/// block.forward(smear::make_tokens<const float>(x_dev, B, L, 768, lengths), {y_dev, B * L * 768});
/// block.backward({dy_dev, B * L * 768}, {dx_dev, B * L * 768});
/// ```
template <class Expert, std::size_t N>
class layer<Expert, N, backend::cuda> : public device::device_layer<Expert, N, device::context> {
  using base = device::device_layer<Expert, N, device::context>;

 public:
  using backend_type = backend::cuda;

  /// Throws value_error for the null stream (see device::context), and what smear::layer's
  /// constructor throws.
  explicit layer(Expert prototype, layer_options options = {}, std::uint64_t seed = 0,
                 cudaStream_t stream = cudaStreamPerThread)
      : base(std::move(prototype), options, seed, stream) {}

  cudaStream_t stream() noexcept { return this->context().stream(); }
};

}  // namespace smear
