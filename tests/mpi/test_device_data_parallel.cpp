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

#include "mpi/training.hpp"
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
    const testing::global_batch<double> g{B, L, d, 50 + k};
    reference.zero_grad();
    opt_rep.zero_grad();
    testing::shard_step(reference, g, 0, B);
    dp.begin_batch(mine);
    testing::shard_step(replica, g, dp.first(), mine);
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
