// Per-step compute and communication of smear's two MPI schemes (smear/mpi.hpp), run under
// `mpirun -np R smear_bench_mpi`: the numbers bench/SCALING.md extends to more processes.
//
//   data     each process: forward + backward of its B/R examples through 4 blocks on the
//            whole experts, each block's gradients handed to smear::mpi::data_parallel after
//            its backward, with and without `overlap`;
//   tensor   each process: forward + backward of all B examples on its 1/R slice of every
//            expert, with the all-reduces of y and dx and the router's gradients inside
//            (smear::mpi::tensor_parallel);
//   allreduce  MPI_Allreduce alone of 8 B .. 32 MB: what bench/scaling_model.py fits the
//            α–β model of bench/SCALING.md to.
//
// Prints one line per measurement, median of the repetitions, as a Markdown table on rank 0.
//   smear_bench_mpi [--d 768] [--m 64] [--length 128] [--batch 32] [--reps 7]

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <smear/mpi.hpp>
#include <smear/mpi/tensor_parallel.hpp>
#include <smear/smear.hpp>
#include <smear/testing.hpp>
#include <string>
#include <vector>

namespace {

constexpr std::size_t N = 8;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

/// The slowest process's time for each repetition, then their median ("communication" below
/// is the step's time beyond its compute alone: what reducing adds).
double median_of_max(std::vector<double> t) {
  MPI_Allreduce(MPI_IN_PLACE, t.data(), static_cast<int>(t.size()), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct sizes {
  std::size_t d = 768, m = 64, L = 128, B = 32, reps = 7;
};

sizes parse(int argc, char** argv) {
  sizes s;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const auto v = static_cast<std::size_t>(std::strtoull(argv[i + 1], nullptr, 10));
    if (k == "--d") s.d = v;
    else if (k == "--m") s.m = v;
    else if (k == "--length") s.L = v;
    else if (k == "--batch") s.B = v;
    else if (k == "--reps") s.reps = v;
    else throw smear::value_error("smear_bench_mpi: unknown option " + k);
  }
  return s;
}

int rank() { return smear::mpi::rank(MPI_COMM_WORLD); }

void row(const char* scheme, int R, double compute, double comm, double bytes) {
  if (rank() == 0)
    std::printf("| %s | %d | %.2f | %.2f | %.2f | %.1f |\n", scheme, R, 1e3 * (compute + comm), 1e3 * compute, 1e3 * comm,
                bytes / 1e6);
}

/// `layers` blocks side by side (each on the same input), the gradients of each handed to the
/// buckets after its backward; with `overlap` each bucket's MPI_Iallreduce starts as it fills
/// (during the other blocks' backward), else one MPI_Allreduce per bucket in finish().
void data_parallel(const sizes& s, bool overlap) {
  constexpr std::size_t layers = 4;
  smear::mpi::data_parallel<float> dp{MPI_COMM_WORLD, {.overlap = overlap}};
  const int R = dp.size();
  std::vector<smear::layer<smear::adapter<float>, N>> blocks;
  for (std::size_t i = 0; i < layers; ++i) {
    blocks.emplace_back(smear::adapter<float>{s.d, s.m}, smear::layer_options{}, i + 1);
    blocks.back().set_replicas(&dp);
  }
  const std::size_t lo = s.B * static_cast<std::size_t>(dp.rank()) / static_cast<std::size_t>(R),
                    hi = s.B * static_cast<std::size_t>(dp.rank() + 1) / static_cast<std::size_t>(R), b = hi - lo;
  smear::rng gen{2};
  const auto x = smear::testing::random_vector<float>(b * s.L * s.d, gen);
  std::vector<float> y(x.size()), dx(x.size()), dy = smear::testing::random_vector<float>(x.size(), gen);
  std::vector<double> compute, step;
  std::size_t bytes = 0;
  for (auto& l : blocks)
    for (auto& p : l.parameters()) bytes += p.grad.size() * sizeof(float);
  for (std::size_t k = 0; k <= s.reps; ++k) {
    for (const bool reduce : {false, true}) {  // the compute alone, then the whole step
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t = clock_type::now();
      dp.begin_batch(b);
      for (auto& l : blocks) {
        l.zero_grad();
        l.forward(smear::make_tokens<const float>(x.data(), b, s.L, s.d), y);
      }
      for (std::size_t i = layers; i-- > 0;) {
        blocks[i].backward(dy, dx);
        if (reduce) dp.ready(blocks[i].parameters());
      }
      if (reduce) dp.finish();
      if (k > 0) (reduce ? step : compute).push_back(seconds_since(t));  // the first warms up
    }
  }
  const double c = median_of_max(compute), w = median_of_max(step);
  row(overlap ? "data, 4 blocks, MPI_Iallreduce as buckets fill" : "data, 4 blocks, MPI_Allreduce in finish()", R, c,
      std::max(0.0, w - c), static_cast<double>(bytes));
}

void tensor_parallel(const sizes& s) {
  const int R = smear::mpi::size(MPI_COMM_WORLD);
  smear::mpi::tensor_parallel<smear::adapter<float>, N> block{smear::adapter<float>{s.d, s.m}, {}, 1, MPI_COMM_WORLD};
  smear::rng gen{2};
  const auto x = smear::testing::random_vector<float>(s.B * s.L * s.d, gen);
  std::vector<float> y(x.size()), dx(x.size()), dy = smear::testing::random_vector<float>(x.size(), gen);
  const double bytes = static_cast<double>(2 * x.size() + block.local().router().gradients().size()) * sizeof(float);
  std::vector<double> step, alone;
  for (std::size_t k = 0; k <= s.reps; ++k) {
    MPI_Barrier(MPI_COMM_WORLD);
    auto t = clock_type::now();
    block.zero_grad();
    block.forward(smear::make_tokens<const float>(x.data(), s.B, s.L, s.d), y);
    block.backward(dy, dx);
    const double whole = seconds_since(t);
    MPI_Barrier(MPI_COMM_WORLD);
    t = clock_type::now();  // the same step's compute alone: the local layer without the sums
    block.local().zero_grad();
    block.local().forward(smear::make_tokens<const float>(x.data(), s.B, s.L, s.d), y);
    block.local().backward(dy, dx);
    if (k > 0) step.push_back(whole), alone.push_back(seconds_since(t));
  }
  const double c = median_of_max(alone), w = median_of_max(step);
  row("tensor", R, c, std::max(0.0, w - c), bytes);
}

void allreduce_sweep() {
  const int R = smear::mpi::size(MPI_COMM_WORLD);
  for (std::size_t n = 2; n <= (std::size_t{8} << 20); n *= 2) {  // 8 B .. 32 MB
    std::vector<float> v(n, 1.0f);
    std::vector<double> t;
    for (int k = 0; k <= 9; ++k) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = clock_type::now();
      smear::mpi::all_sum<float>(MPI_COMM_WORLD, v);
      if (k > 0) t.push_back(seconds_since(t0));
    }
    const double m = median_of_max(t);
    if (rank() == 0) std::printf("| allreduce | %d | %.4f | | | %.6f |\n", R, 1e3 * m, static_cast<double>(n * 4) / 1e6);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rc = 0;
  try {
    const sizes s = parse(argc, argv);
    if (rank() == 0) {
      std::printf("d %zu, m %zu, N %zu, L %zu, B %zu (global batch), float, %s, SMEAR_NUM_THREADS=%s\n\n", s.d, s.m, N,
                  s.L, s.B, smear::backend::cpu_kernels_report().c_str(), std::getenv("SMEAR_NUM_THREADS") ? std::getenv("SMEAR_NUM_THREADS") : "unset");
      std::printf("| scheme | R | step (ms) | compute (ms) | communication (ms) | MB reduced per process |\n");
      std::printf("|---|---|---|---|---|---|\n");
    }
    data_parallel(s, true);
    data_parallel(s, false);
    tensor_parallel(s);
    allreduce_sweep();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "smear_bench_mpi: %s\n", e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
