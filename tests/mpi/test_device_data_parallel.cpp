// Data parallelism for the cuda layer's executor (device_layer), whose tensors live in an
// execution context's memory: smear::mpi stages them through the host with the context's
// copies. Run here over device::host_context (the same executor on the CPU, its "device"
// memory host memory reached only through the context), against one host process trained on
// the whole batches. A GPU context takes the same path with cudaMemcpy.

#include <doctest/doctest.h>

#include <smear/backend/cuda/host_context.hpp>
#include <smear/cuda/device_layer.hpp>
#include <smear/cuda/optimizers.hpp>
#include <smear/mpi.hpp>
#include <smear/smear.hpp>
#include <string>
#include <vector>

#include "support/testing.hpp"

using namespace smear;

namespace {

constexpr std::size_t d = 5, m = 3, N = 3, L = 3, steps = 3;
using device_block = device::device_layer<adapter<double>, N, device::host_context>;

void check_device_training(const std::string& name, layer_options options) {
  CAPTURE(name);
  mpi::data_parallel<double> dp{MPI_COMM_WORLD, {.bucket_bytes = 64 * sizeof(double)}};
  const std::size_t R = static_cast<std::size_t>(dp.size()), mine = 2 + (dp.rank() == 1 ? 1 : 0), B = 2 * R + 1;
  layer<adapter<double>, N> reference{adapter<double>{d, m}, options, 4};
  device_block replica{adapter<double>{d, m}, options, 4};  // starts as the host layer with its seed
  replica.set_replicas(&dp);
  if (dp.rank() != 0) {  // spoil the others' start: the broadcast must repair it
    for (auto& v : replica.bank()[0]) v += 1.0;
    replica.upload();
  }
  dp.broadcast(replica.parameters(), replica.context());
  sgd<double> opt_ref{reference.parameters(), {.lr = 0.3, .momentum = 0.5}};
  device::sgd<double, device::host_context> opt_rep{replica.parameters(), {.lr = 0.3, .momentum = 0.5},
                                                    replica.context()};
  for (std::uint64_t k = 0; k < steps; ++k) {
    rng gen{50 + k};
    const auto x = testing::random_vector<double>(B * L * d, gen), w = testing::random_vector<double>(B * L * d, gen);
    std::vector<std::int32_t> lengths;
    for (std::size_t b = 0; b < B; ++b) lengths.push_back(static_cast<std::int32_t>(1 + gen.below(L)));
    auto run = [&](auto& block, std::size_t first, std::size_t count) {
      const std::size_t row = L * d;
      std::vector<double> y(count * row), dy(count * row), dx(count * row), losses(count);
      block.forward(tokens<const double>{x.data() + first * row, count, L, d, std::span(lengths).subspan(first, count)},
                    y);
      for (std::size_t b = 0; b < count; ++b)
        for (std::size_t i = 0; i < row; ++i) {
          losses[b] += w[(first + b) * row + i] * y[b * row + i];
          dy[b * row + i] = w[(first + b) * row + i] / static_cast<double>(count);
        }
      block.backward(dy, dx, losses);
    };
    reference.zero_grad();
    opt_rep.zero_grad();
    run(reference, 0, B);
    dp.begin_batch(mine);
    run(replica, dp.first(), mine);
    dp.ready(replica.parameters(), replica.context());
    dp.finish();
    opt_ref.step();
    opt_rep.step();
  }
  replica.download();
  const auto a = replica.bank().values(), b = reference.bank().values();
  const double bank_err = testing::relative_error(std::span<const double>(a.data, a.rows * a.cols),
                                                  std::span<const double>(b.data, b.rows * b.cols));
  const double router_err = testing::relative_error(replica.router().values(), reference.router().values());
  INFO("bank " << bank_err << ", router " << router_err);
  CHECK(bank_err <= 1e-12);
  CHECK(router_err <= 1e-12);
}

}  // namespace

TEST_CASE("data parallel: the cuda layer's executor, its tensors staged through the host") {
  check_device_training("smear with expert dropout", {.router = {.expert_dropout = 0.3}});
  check_device_training("st_gumbel", {.routing = {.strategy = strategy::top_k, .estimator = estimator::st_gumbel}});
  check_device_training("reinforce", {.routing = {.strategy = strategy::top_k, .estimator = estimator::reinforce}});
}

TEST_CASE("data parallel: device tensors without their context are refused") {
  mpi::data_parallel<double> dp;
  device_block block{adapter<double>{d, m}, {}, 1};
  dp.begin_batch(1);
  CHECK_THROWS_WITH_AS(dp.ready(block.parameters()), doctest::Contains("block.context()"), value_error);
  CHECK_THROWS_WITH_AS(dp.broadcast(block.parameters()), doctest::Contains("block.context()"), value_error);
}
