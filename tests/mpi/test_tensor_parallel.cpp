// Tensor-parallel blocks over MPI (smear/mpi/tensor_parallel.hpp): R processes, each with a
// slice of every expert, against the single-process layer: forward, backward, training steps,
// and checkpoints saved from the slices loaded into a full layer and back.

#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <smear/io/checkpoint.hpp>
#include <smear/mpi/tensor_parallel.hpp>
#include <smear/smear.hpp>
#include <string>
#include <vector>

#include "support/testing.hpp"

using namespace smear;

namespace {

constexpr std::size_t d = 8, m = 7, N = 3, L = 4, B = 3;  // m = 7: the slices differ in size

template <class T>
using full_layer = layer<adapter<T>, N>;
template <class T>
using split_layer = mpi::tensor_parallel<adapter<T>, N>;

/// The gradients of `full`'s bank as the slices hold them, gathered through a scratch layer.
template <class T>
std::vector<T> gathered_bank_gradients(split_layer<T>& tp, const full_layer<T>& shape) {
  full_layer<T> g = shape;
  auto& local = tp.local();
  // swap each slice's values and gradients, gather the "values", swap back
  auto v = local.bank().values(), gr = local.bank().gradients();
  std::swap_ranges(v.data, v.data + v.rows * v.cols, gr.data);
  tp.gather(g);
  std::swap_ranges(v.data, v.data + v.rows * v.cols, gr.data);
  const auto out = g.bank().values();
  return {out.data, out.data + out.rows * out.cols};
}

template <class T>
void check_close(std::span<const T> a, std::span<const T> b, double tol, const char* what) {
  const double err = testing::relative_error(a, b);
  INFO(what << ": relative difference " << err);
  CHECK(err <= tol);
}

/// Every parameter of `a` against the same one of `b`.
template <class T, class A, class B>
void check_same_parameters(A& a, B& b, double tol, const char* what) {
  const auto pa = a.parameters(), pb = b.parameters();
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CAPTURE(pa[i].name);
    check_close<T>(pa[i].value, pb[i].value, tol, what);
  }
}

template <class T>
void check_against_full(layer_options options, bool up_bias, double tol) {
  const adapter<T> expert{d, m, {.act = activation::gelu, .up_bias = up_bias}};
  full_layer<T> full{expert, options, 5};
  rng init{3};
  testing::randomise(full, init);
  split_layer<T> tp{expert, options, 5, MPI_COMM_WORLD};
  tp.scatter(full);
  sgd<T> opt_full{full.parameters(), {.lr = 0.1, .momentum = 0.5}};
  sgd<T> opt_tp{tp.parameters(), {.lr = 0.1, .momentum = 0.5}};
  const std::vector<std::int32_t> lengths{4, 2, 3};
  for (std::uint64_t k = 0; k < 3; ++k) {
    rng gen{20 + k};
    const auto x = testing::random_vector<T>(B * L * d, gen), dy = testing::random_vector<T>(B * L * d, gen);
    std::vector<T> y_full(x.size()), y_tp(x.size()), dx_full(x.size()), dx_tp(x.size());
    const tokens<const T> xt{x.data(), B, L, d, lengths};
    full.zero_grad();
    tp.zero_grad();
    full.forward(xt, y_full);
    tp.forward(xt, y_tp);
    check_close<T>(y_tp, y_full, tol, "y");
    full.backward(dy, dx_full);
    tp.backward(dy, dx_tp);
    check_close<T>(dx_tp, dx_full, tol, "dx");
    check_close<T>(tp.local().router().gradients(), full.router().gradients(), tol, "router gradients");
    const auto bank_grads = gathered_bank_gradients(tp, full);
    const auto fg = full.bank().gradients();
    check_close<T>(bank_grads, std::span<const T>(fg.data, fg.rows * fg.cols), tol, "expert gradients");
    opt_full.step();
    opt_tp.step();
  }
  full_layer<T> after = full;
  tp.gather(after);
  check_same_parameters<T>(after, full, tol, "parameters after 3 steps");
}

}  // namespace

TEST_CASE("tensor parallel: forward, backward and training equal the single-process layer") {
  for (bool up_bias : {false, true}) {
    CAPTURE(up_bias);
    check_against_full<double>({}, up_bias, 1e-12);
    check_against_full<double>({.routing = {.strategy = strategy::ensemble}}, up_bias, 1e-12);
    check_against_full<double>({.router = {.expert_dropout = 0.3}}, up_bias, 1e-12);
    check_against_full<float>({}, up_bias, 1e-5);
  }
}

TEST_CASE("tensor parallel: a checkpoint of the slices loads into a full layer and back") {
  const adapter<double> expert{d, m, {.up_bias = true}};
  full_layer<double> full{expert, {}, 9};
  rng init{4};
  testing::randomise(full, init);
  split_layer<double> tp{expert, {}, 1, MPI_COMM_WORLD};
  tp.scatter(full);
  const int rank = mpi::rank(MPI_COMM_WORLD);
  long id = ::getpid();  // rank 0's, for every process
  MPI_Bcast(&id, 1, MPI_LONG, 0, MPI_COMM_WORLD);
  const auto path = std::filesystem::temp_directory_path() / ("smear_tp_" + std::to_string(id) + ".safetensors");
  full_layer<double> gathered{expert, {}, 2};
  tp.gather(gathered);
  if (rank == 0) save(path, gathered);
  MPI_Barrier(MPI_COMM_WORLD);
  full_layer<double> loaded{expert, {}, 3};  // an unsharded layer
  load(path, loaded);
  check_same_parameters<double>(loaded, full, 0, "full layer loaded from the slices' checkpoint");
  split_layer<double> back{expert, {}, 6, MPI_COMM_WORLD};  // and back into slices
  back.scatter(loaded);
  check_same_parameters<double>(back, tp, 0, "slices loaded back");
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) std::filesystem::remove(path);
}

TEST_CASE("tensor parallel: the errors") {
  const adapter<double> expert{d, m};
  CHECK_THROWS_WITH_AS((split_layer<double>{expert, {.routing = {.strategy = strategy::tag}}, 0, MPI_COMM_WORLD}),
                       doctest::Contains("is not split"), value_error);
  CHECK_THROWS_WITH_AS((split_layer<double>{adapter<double>{d, 1}, {}, 0, MPI_COMM_WORLD}),
                       doctest::Contains("units to split"), value_error);
  split_layer<double> tp{expert, {}, 0, MPI_COMM_WORLD};
  full_layer<double> other{adapter<double>{d, m + 1}, {}, 0};  // another bottleneck
  CHECK_THROWS_WITH_AS(tp.scatter(other), doctest::Contains("not the expert this block splits"), shape_error);
  CHECK_THROWS_WITH_AS(tp.gather(other), doctest::Contains("not the expert this block splits"), shape_error);
}
