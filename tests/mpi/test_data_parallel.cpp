// Data parallelism over MPI (smear/mpi.hpp): R processes, each with a shard of every global
// batch, must end k training steps with the parameters and routing state of one process that
// trained on the whole batches. Every process also runs that single-process reference (same
// seed, same data), so each compares locally. Run by mpirun with 2 and 4 processes.

#include <doctest/doctest.h>

#include <smear/mpi.hpp>
#include <smear/smear.hpp>
#include <string>
#include <vector>

#include "mpi/training.hpp"
#include "support/testing.hpp"

using namespace smear;

namespace {

constexpr std::size_t d = 6, m = 3, N = 4, L = 3, steps = 3;

struct setup {
  std::string name;
  layer_options options;
  bool tags = false;
};

std::vector<setup> setups() {
  auto top1 = [](estimator e) { return strategy_options{.strategy = strategy::top_k, .estimator = e}; };
  std::vector<setup> out;
  out.push_back({"smear with expert dropout", {.router = {.expert_dropout = 0.3}}});
  out.push_back({"ensemble", {.routing = {.strategy = strategy::ensemble}}});
  out.push_back({"st_gumbel", {.routing = top1(estimator::st_gumbel)}});
  auto reinforce = top1(estimator::reinforce);
  reinforce.entropy_bonus = 0.01;  // an auxiliary loss
  out.push_back({"reinforce, moving-average baseline", {.routing = reinforce}});
  reinforce.baseline = baseline::learned;
  out.push_back({"reinforce, learned baseline", {.routing = reinforce}});
  out.push_back({"dselect (auxiliary losses)", {.routing = top1(estimator::dselect)}});
  out.push_back({"latent_skills", {.routing = {.strategy = strategy::latent_skills, .tasks = 3}}, true});
  out.push_back({"adamix", {.routing = {.strategy = strategy::adamix}}});
  out.push_back({"random", {.routing = {.strategy = strategy::random}}});
  out.push_back({"cluster", {.routing = {.strategy = strategy::cluster}}});
  out.push_back({"soft_moe", {.routing = {.strategy = strategy::soft_moe, .soft_slots = 2}}});
  return out;
}

using testing::global_batch;
using testing::shard_step;

template <class T>
void check_equal(std::span<const T> a, std::span<const T> b, double tol, const std::string& what) {
  REQUIRE(a.size() == b.size());
  const double err = testing::relative_error(a, b);
  INFO(what << ": relative difference " << err);
  CHECK(err <= tol);
}

/// k steps of the replicas (shards of sizes 4 + [rank == 0], so unequal) against the reference.
template <class T>
void check_training(const setup& s, double tol, mpi::data_parallel_options options) {
  mpi::data_parallel<T> dp{MPI_COMM_WORLD, options};
  const std::size_t R = static_cast<std::size_t>(dp.size()), mine = 4 + (dp.rank() == 0 ? 1 : 0), B = 4 * R + 1;
  layer<adapter<T>, N> reference{adapter<T>{d, m}, s.options, 7}, replica = reference;
  replica.set_replicas(&dp);
  rng init{11};
  testing::randomise(reference, init);
  if (dp.rank() == 0) testing::copy_parameters(reference, replica);
  dp.broadcast(replica.parameters());  // the others start from rank 0's parameters
  sgd<T> opt_ref{reference.parameters(), {.lr = 0.2, .momentum = 0.5}};
  sgd<T> opt_rep{replica.parameters(), {.lr = 0.2, .momentum = 0.5}};
  for (std::size_t k = 0; k < steps; ++k) {
    const global_batch<T> g{B, L, d, 100 + k};
    reference.zero_grad();
    replica.zero_grad();
    const T aux_ref = shard_step(reference, g, 0, B, s.tags);
    dp.begin_batch(mine);
    T aux = shard_step(replica, g, dp.first(), mine, s.tags) * static_cast<T>(mine) / static_cast<T>(B);
    dp.ready(replica.parameters());
    dp.finish();
    dp.sum(std::span<T>(&aux, 1));  // the global batch's auxiliary loss, from the local means
    CHECK(std::abs(aux - aux_ref) <= tol * (1 + std::abs(aux_ref)));
    opt_ref.step();
    opt_rep.step();
  }
  auto a = replica.parameters(), b = reference.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    check_equal<T>(a[i].value, b[i].value, tol, s.name + ": parameter " + a[i].name);
  if (s.options.routing.strategy == strategy::top_k && s.options.routing.estimator == estimator::reinforce)
    CHECK(std::abs(replica.baseline().average() - reference.baseline().average()) <=
          tol * (1 + std::abs(reference.baseline().average())));
  if (s.options.routing.strategy == strategy::cluster)
    check_equal<T>(std::span<const T>(replica.cluster_centres().data, N * d),
                   std::span<const T>(reference.cluster_centres().data, N * d), tol, s.name + ": cluster centres");
}

}  // namespace

TEST_CASE("data parallel: k steps on R processes equal k steps of one on the whole batches (float64)") {
  for (const auto& s : setups()) {
    CAPTURE(s.name);
    check_training<double>(s, 1e-12, {});
    // many small buckets, parameters split across them, reduced in finish() or as they fill
    check_training<double>(s, 1e-12, {.bucket_bytes = 40 * sizeof(double)});
    check_training<double>(s, 1e-12, {.bucket_bytes = 40 * sizeof(double), .overlap = true});
  }
}

TEST_CASE("data parallel: the same in float32, to 2e-5") {
  for (const auto& s : setups()) {
    CAPTURE(s.name);
    check_training<float>(s, 2e-5, {.bucket_bytes = 256, .overlap = true});
  }
}

TEST_CASE("data parallel: the errors") {
  mpi::data_parallel<double> dp;
  layer<adapter<double>, N> block{adapter<double>{d, m}};
  CHECK_THROWS_AS(dp.ready(block.parameters()), state_error);  // before begin_batch
  CHECK_THROWS_AS(dp.begin_batch(0), value_error);             // an empty global batch
  dp.begin_batch(2);  // a global batch of 2·R examples: 2·R + 1 fit in no process's share
  block.set_replicas(&dp);
  const std::size_t too_many = 2 * static_cast<std::size_t>(dp.size()) + 1;
  const global_batch<double> g{too_many, L, d, 1};
  CHECK_THROWS_WITH_AS(shard_step(block, g, 0, too_many), doctest::Contains("do not fit"), value_error);
  block.train(false);  // evaluation ignores the replicas: any batch
  std::vector<double> y(too_many * L * d);
  block.forward(tokens<const double>{g.x.data(), too_many, L, d, g.lengths}, y);
  dp.ready(block.parameters());
  CHECK_THROWS_AS(dp.begin_batch(2), state_error);  // ready() gradients not finished
  dp.finish();
}
