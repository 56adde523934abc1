// smear's CPU benchmarks: forward and forward+backward of a routing block of adapter experts
// (smear, top-1, ensemble, Soft MoE, a single adapter), and the GEMM ceiling of the same shapes.
//
// Names read `kind/mode/d:768/m:64/N:8/L:128/B:32/threads:2`, so one regex picks a subset:
//   smear_bench --benchmark_filter='/d:768/m:64/N:8/L:128/B:32/threads:2$'
// kinds: smear, top1, ensemble, soft_moe (one slot per expert), single (smear::layer<adapter<float>, 1>), cached (smear inference
// with a fixed per-task routing: experts merged once by set_task_routing and reused), gemm (the plain Eigen
// GEMMs a SMEAR block runs at that shape, without any element-wise work: the ceiling), and
// gemm_square/n:.../threads:... (one square GEMM, the machine's peak for reference).
// modes: fwd (inference: forward only) and fwdbwd (training: forward then backward).
// shared/fwd/.../callers:K: inference throughput of one evaluation layer shared by K threads,
// each with its own workspace and one OpenMP thread (examples/s over all callers).
// decode/d:768/m:64/N:8/segment:S/B:B and decode_single/...: generating one token at a time
// (tokens/s): SMEAR with causal segment routing through smear::layer::decoder, which merges
// at each segment's first token, against a single adapter's forward of each token; one
// iteration is S steps (one segment, its merge included).
//
// GFLOP/s counts the merge, 2·B·N·P, and the application, 4·B·L·d·m forward; a backward adds
// 8·B·L·d·m (the adapter's four GEMMs) and 4·B·N·P (the two bank GEMMs). top-1 counts one
// expert's application and no merge; the ensemble counts N applications. Soft MoE counts the
// experts on B·N slot rows, 4·B·N·d·m, and its per-token GEMMs, 2·B·L·N·d each for the logits,
// the dispatch and the combine; a backward twice each.

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "smear/smear.hpp"

namespace {

enum class kind { smear, top1, ensemble, soft_moe, single, cached, gemm };
enum class mode { fwd, fwdbwd };

constexpr const char* name(kind k) {
  switch (k) {
    case kind::smear: return "smear";
    case kind::top1: return "top1";
    case kind::ensemble: return "ensemble";
    case kind::soft_moe: return "soft_moe";
    case kind::single: return "single";
    case kind::cached: return "cached";
    case kind::gemm: return "gemm";
  }
  return "?";
}

struct workload {
  kind k;
  mode md;
  std::size_t d, m, n, length, batch, threads;

  std::string label() const {
    return std::string(name(k)) + (md == mode::fwd ? "/fwd" : "/fwdbwd") + "/d:" + std::to_string(d) +
           "/m:" + std::to_string(m) + "/N:" + std::to_string(n) + "/L:" + std::to_string(length) +
           "/B:" + std::to_string(batch) + "/threads:" + std::to_string(threads);
  }
  std::size_t parameters() const { return 2 * d * m + m; }  // adapter without up bias

  /// The FLOPs the block must do (see the file comment).
  double flops() const {
    const double B = double(batch), N = double(n), P = double(parameters());
    const double apply = 4.0 * B * double(length) * double(d) * double(m);
    const bool bw = md == mode::fwdbwd;
    switch (k) {
      case kind::top1: return bw ? 3 * apply : apply;
      case kind::ensemble: return N * (bw ? 3 * apply : apply);
      case kind::soft_moe: {
        const double fwd = N * apply / double(length) + 6.0 * B * double(length) * N * double(d);
        return bw ? 3 * fwd : fwd;
      }
      case kind::cached: return bw ? 3 * apply : apply;  // merged once, outside the timing
      case kind::smear:
      case kind::single:
      case kind::gemm: return bw ? 6 * B * N * P + 3 * apply : 2 * B * N * P + apply;
    }
    return 0;
  }
};

void set_threads(std::size_t t) {
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(t));
#else
  (void)t;
#endif
}

std::vector<float> random_vector(std::size_t n, std::uint64_t seed) {
  smear::rng gen{seed};
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(gen.normal());
  return v;
}

/// The layer options of a benchmark kind: top-1 is top_k with k = 1 (straight-through
/// Gumbel-softmax, the default estimator), the ensemble mixes every expert's output, Soft MoE
/// runs each expert on one slot per example.
smear::layer_options options_for(kind k) {
  smear::layer_options o{};
  if (k == kind::top1) o.routing.strategy = smear::strategy::top_k;
  if (k == kind::ensemble) o.routing.strategy = smear::strategy::ensemble;
  if (k == kind::soft_moe) o.routing.strategy = smear::strategy::soft_moe;
  return o;
}

template <std::size_t N>
void run_layer(benchmark::State& state, workload w) {
  set_threads(w.threads);
  using expert = smear::adapter<float>;
  smear::layer<expert, N> block{expert{w.d, w.m}, options_for(w.k), 42};
  const bool bw = w.md == mode::fwdbwd;
  block.train(bw);
  const std::size_t size = w.batch * w.length * w.d;
  const std::vector<float> x = random_vector(size, 1), dy = random_vector(size, 2);
  std::vector<float> y(size), dx(size);
  const auto tokens = smear::make_tokens<const float>(x.data(), w.batch, w.length, w.d);
  // cached: inference with a fixed routing per task (one task here), merged once and reused
  const std::vector<float> task_p(N, 1.0f / float(N));
  const std::vector<std::int32_t> tags(w.batch, 0);
  if (w.k == kind::cached) {
    if (bw) {
      state.SkipWithError("the merged-expert cache serves inference only");
      return;
    }
    block.set_task_routing(smear::matrix_ref<const float>{task_p.data(), 1, N});
  }
  const smear::route_inputs route{.tags = w.k == kind::cached ? std::span<const std::int32_t>(tags)
                                                              : std::span<const std::int32_t>{}};
  auto step = [&] {
    block.forward(tokens, y, route);
    if (bw) block.backward(dy, dx);
  };
  step();  // warm-up: buffers are sized here
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  if (w.k == kind::cached && block.cache_builds() != 1) {
    state.SkipWithError("the merged-expert cache was rebuilt during the timing");
    return;
  }
  const double P = double(block.bank().parameter_count());
  const double required =
      double(sizeof(float)) * (double(w.batch) * P + double(w.batch) * double(block.expert().saved_size(w.length)));
  state.counters["GFLOP/s"] = benchmark::Counter(w.flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["workspace_MB"] = double(block.workspace_bytes()) * 1e-6;
  state.counters["workspace_ratio"] = double(block.workspace_bytes()) / required;
}

/// K callers share one SMEAR layer in evaluation mode, each forward through its own workspace
/// (smear::layer::workspace); every timed iteration runs `per_call` forwards in each caller.
void run_shared(benchmark::State& state, workload w, std::size_t callers) {
  constexpr std::size_t N = 8, per_call = 4;
  set_threads(1);
  using expert = smear::adapter<float>;
  smear::layer<expert, N> block{expert{w.d, w.m}, options_for(kind::smear), 42};
  block.train(false);
  const smear::layer<expert, N>& shared = block;
  const std::size_t size = w.batch * w.length * w.d;
  const std::vector<float> x = random_vector(size, 1);
  const auto tokens = smear::make_tokens<const float>(x.data(), w.batch, w.length, w.d);
  std::vector<smear::layer<expert, N>::workspace> ws(callers);
  std::vector<std::vector<float>> y(callers, std::vector<float>(size));
  auto calls = [&](std::size_t c) {
    set_threads(1);  // a new thread starts with OpenMP's default thread count, not main's
    for (std::size_t i = 0; i < per_call; ++i) shared.forward(ws[c], tokens, y[c]);
  };
  for (std::size_t c = 0; c < callers; ++c) calls(c);  // warm-up: buffers are sized here
  for (auto _ : state) {
    std::vector<std::jthread> pool;
    for (std::size_t c = 0; c < callers; ++c) pool.emplace_back(calls, c);
    pool.clear();  // joins
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * callers * per_call * w.batch));
}

/// Decoding B sequences one token at a time for one segment of `segment` tokens per
/// iteration: SMEAR's decoder (N = 8) or, with `single`, one adapter's forward per token.
void run_decode(benchmark::State& state, workload w, std::size_t segment, bool single) {
  constexpr std::size_t N = 8;
  set_threads(w.threads);
  using expert = smear::adapter<float>;
  const std::vector<float> x = random_vector(w.batch * w.d, 1);
  std::vector<float> y(x.size());
  const auto run = [&](auto&& step) {
    for (std::size_t t = 0; t < segment; ++t) step();  // warm-up: buffers are sized here
    for (auto _ : state) {
      for (std::size_t t = 0; t < segment; ++t) step();
      benchmark::DoNotOptimize(y.data());
      benchmark::ClobberMemory();
    }
    state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * segment * w.batch));
  };
  if (single) {
    smear::layer<expert, 1> block{expert{w.d, w.m}, {}, 42};
    block.train(false);
    const auto tokens = smear::make_tokens<const float>(x.data(), w.batch, 1, w.d);
    run([&] { block.forward(tokens, y); });
    return;
  }
  smear::layer_options o{};
  o.router.segment_length = segment;
  smear::layer<expert, N> block{expert{w.d, w.m}, o, 42};
  block.train(false);
  smear::layer<expert, N>::decoder dec{block, w.batch};
  run([&] { dec.step(x, y); });
  state.counters["merges_per_token"] =
      double(dec.merges()) / double((state.iterations() + 1) * segment);  // the warm-up's segment included
}

/// The GEMMs of a SMEAR block at this shape, as plain Eigen products over preallocated
/// matrices, spread over examples like the layer: the most the layer's GEMMs can reach.
void run_gemm(benchmark::State& state, workload w) {
  set_threads(w.threads);
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using map = Eigen::Map<mat>;
  using cmap = Eigen::Map<const mat>;
  const auto B = static_cast<Eigen::Index>(w.batch), L = static_cast<Eigen::Index>(w.length),
             d = static_cast<Eigen::Index>(w.d), m = static_cast<Eigen::Index>(w.m),
             N = static_cast<Eigen::Index>(w.n), P = static_cast<Eigen::Index>(w.parameters());
  const std::size_t size = w.batch * w.length * w.d;
  const bool bw = w.md == mode::fwdbwd;
  std::vector<float> xv = random_vector(size, 1), dyv = random_vector(size, 2), yv(size), dxv(size);
  mat probs = mat::Constant(B, N, 1.0f / float(N));
  mat theta = Eigen::Map<mat>(random_vector(w.n * w.parameters(), 3).data(), N, P) * 0.01f;
  mat merged(B, P), grads(B, P), dtheta = mat::Zero(N, P), dprobs(B, N);
  const std::size_t threads = w.threads;
  std::vector<mat> hidden(threads, mat(L, m)), dhidden(threads, mat(L, m));
  const Eigen::Index up = d * m + m;
  auto example = [&](Eigen::Index b, std::size_t t) {
    cmap xb(xv.data() + b * L * d, L, d), dyb(dyv.data() + b * L * d, L, d);
    map yb(yv.data() + b * L * d, L, d), dxb(dxv.data() + b * L * d, L, d);
    cmap wd(merged.row(b).data(), d, m), wu(merged.row(b).data() + up, m, d);
    mat& h = hidden[t];
    h.noalias() = xb * wd;
    yb.noalias() = h * wu;
    if (!bw) return;
    map dwd(grads.row(b).data(), d, m), dwu(grads.row(b).data() + up, m, d);
    mat& dh = dhidden[t];
    dwu.noalias() = h.transpose() * dyb;
    dh.noalias() = dyb * wu.transpose();
    dwd.noalias() = xb.transpose() * dh;
    dxb.noalias() = dh * wd.transpose();
  };
  auto step = [&] {
    merged.noalias() = probs * theta;
#ifdef _OPENMP
    if (w.batch > 1 && threads > 1) {
#pragma omp parallel for schedule(static)
      for (Eigen::Index b = 0; b < B; ++b) example(b, static_cast<std::size_t>(omp_get_thread_num()));
    } else
#endif
      for (Eigen::Index b = 0; b < B; ++b) example(b, 0);
    if (bw) {
      dtheta.noalias() += probs.transpose() * grads;
      dprobs.noalias() = grads * theta.transpose();
    }
  };
  step();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(yv.data());
    benchmark::DoNotOptimize(dtheta.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(w.flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// One n×n by n×n GEMM: what the cores can do at their best, for reference.
void run_gemm_square(benchmark::State& state, std::size_t n, std::size_t threads) {
  set_threads(threads);
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const auto k = static_cast<Eigen::Index>(n);
  mat a = mat::Random(k, k), b = mat::Random(k, k), c(k, k);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(n) * double(n) * double(n) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void add(workload w) {
  auto* b = [&]() -> benchmark::internal::Benchmark* {
    const std::string label = w.label();
    if (w.k == kind::gemm) return benchmark::RegisterBenchmark(label.c_str(), run_gemm, w);
    switch (w.n) {
      case 1: return benchmark::RegisterBenchmark(label.c_str(), run_layer<1>, w);
      case 4: return benchmark::RegisterBenchmark(label.c_str(), run_layer<4>, w);
      case 8: return benchmark::RegisterBenchmark(label.c_str(), run_layer<8>, w);
      case 16: return benchmark::RegisterBenchmark(label.c_str(), run_layer<16>, w);
      case 32: return benchmark::RegisterBenchmark(label.c_str(), run_layer<32>, w);
      default: return nullptr;
    }
  }();
  // "Time" is wall-clock time; "CPU" is the whole process's CPU time, all threads together
  if (b != nullptr) b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}

void register_grid() {
  struct dims {
    std::size_t d, m;
  };
  for (std::size_t threads : {1, 2})
    for (auto md : {mode::fwd, mode::fwdbwd})
      for (dims s : {dims{768, 24}, dims{768, 64}, dims{512, 32}})
        for (std::size_t batch : {32, 1})
          for (std::size_t length : {128, 1, 16, 512}) {
            add({kind::single, md, s.d, s.m, 1, length, batch, threads});
            add({kind::gemm, md, s.d, s.m, 1, length, batch, threads});
            for (std::size_t n : {8, 4, 16, 32})
              for (kind k : {kind::smear, kind::gemm, kind::top1, kind::ensemble, kind::soft_moe, kind::cached})
                if (k != kind::cached || md == mode::fwd) add({k, md, s.d, s.m, n, length, batch, threads});
          }
  for (std::size_t callers : {1, 2, 4}) {
    const workload w{kind::smear, mode::fwd, 768, 64, 8, 128, 32, 1};
    benchmark::RegisterBenchmark(("shared/fwd/d:768/m:64/N:8/L:128/B:32/callers:" + std::to_string(callers)).c_str(),
                                 run_shared, w, callers)
        ->UseRealTime()
        ->MeasureProcessCPUTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (std::size_t batch : {1, 32})
    for (std::size_t segment : {16, 128})
      for (bool single : {false, true}) {
        const workload w{kind::smear, mode::fwd, 768, 64, 8, segment, batch, 1};
        const std::string label = std::string(single ? "decode_single" : "decode") + "/d:768/m:64/N:" +
                                  (single ? "1" : "8") + "/segment:" + std::to_string(segment) +
                                  "/B:" + std::to_string(batch) + "/threads:1";
        benchmark::RegisterBenchmark(label.c_str(), run_decode, w, segment, single)
            ->UseRealTime()
            ->MeasureProcessCPUTime()
            ->Unit(benchmark::kMicrosecond);
      }
  for (std::size_t threads : {1, 2})
    benchmark::RegisterBenchmark(("gemm_square/n:1024/threads:" + std::to_string(threads)).c_str(),
                                 run_gemm_square, std::size_t{1024}, threads)
        ->UseRealTime()
        ->MeasureProcessCPUTime()
        ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  register_grid();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("smear_simd", xsimd::default_arch::name());
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
