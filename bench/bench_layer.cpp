// smear's CPU benchmarks: forward and forward+backward of a routing block of adapter experts
// (smear, top-1, ensemble, Soft MoE, a single adapter), and the GEMM ceiling of the same shapes.
//
// Names read `kind/mode/d:768/m:64/N:8/L:128/B:32/threads:2`, so one regex picks a subset:
//   smear_bench --benchmark_filter='/d:768/m:64/N:8/L:128/B:32/threads:2$'
// kinds: smear, top1, ensemble, soft_moe (one slot per expert), single (smear::layer<adapter<float>, 1>), cached (smear inference
// with a fixed per-task routing: experts merged once by set_task_routing and reused), gemm (the plain Eigen
// GEMMs a SMEAR block runs at that shape, without any element-wise work: the ceiling), and
// gemm_square/n:.../threads:... (one square GEMM, the machine's peak for reference), and, in a build
// with libxsmm or oneDNN, xsmm and onednn (SMEAR on the cpu backend with its per-example GEMMs
// through libxsmm's JIT kernels or oneDNN's sgemm: bench/anchor_backends.hpp; N = 8, L = 128,
// B = 32 only).
// modes: fwd (inference: forward only) and fwdbwd (training: forward then backward).
// shared/fwd/.../callers:K: inference throughput of one evaluation layer shared by K threads,
// each with its own workspace and one thread of the pool (examples/s over all callers).
// loaded/...: the same as the plain row while a competing process (started for the run and
// stopped after it) keeps one core busy: what a shared machine gives.
// fma_peak/threads:T: a register-only loop of independent FMAs at the widest vector width the
// CPU runs, on T threads of the pool: the machine's peak, measured in the same run;
// stream_triad/threads:T: STREAM's triad over 3 × 64 MB, the memory bandwidth (GB/s: bytes
// read and written, without the write-allocate reads).
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

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <csignal>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "anchor_backends.hpp"  // before smear's other headers (see there)
#include "smear/smear.hpp"

namespace {

enum class kind { smear, top1, ensemble, soft_moe, single, cached, gemm, xsmm, onednn };
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
    case kind::xsmm: return "xsmm";
    case kind::onednn: return "onednn";
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
      case kind::xsmm:
      case kind::onednn:
      case kind::single:
      case kind::gemm: return bw ? 6 * B * N * P + 3 * apply : 2 * B * N * P + apply;
    }
    return 0;
  }
};

/// A child process that keeps one core busy from construction to destruction.
class competing_process {
 public:
  competing_process() : pid_(fork()) {
    if (pid_ == 0) {
      volatile std::uint64_t i = 0;
      for (;;) i = i + 1;  // nothing but the CPU: safe in the child of a threaded process
    }
  }
  competing_process(const competing_process&) = delete;
  competing_process& operator=(const competing_process&) = delete;
  ~competing_process() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  bool started() const noexcept { return pid_ > 0; }

 private:
  pid_t pid_;
};

std::vector<float> random_vector(std::size_t n, std::uint64_t seed) {
  smear::rng gen{seed};
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(gen.normal());
  return v;
}

/// The layer options of a benchmark kind: top-1 is top_k with k = 1 (straight-through
/// Gumbel-softmax, the default estimator), the ensemble mixes every expert's output, Soft MoE
/// runs each expert on one slot per example.
smear::layer_options options_for(kind k, std::size_t threads) {
  smear::layer_options o{.threads = threads};
  if (k == kind::top1) o.routing.strategy = smear::strategy::top_k;
  if (k == kind::ensemble) o.routing.strategy = smear::strategy::ensemble;
  if (k == kind::soft_moe) o.routing.strategy = smear::strategy::soft_moe;
  return o;
}

template <std::size_t N, class Backend = smear::default_backend>
void run_layer(benchmark::State& state, workload w, bool loaded) {
  using expert = smear::adapter<float>;
  smear::layer<expert, N, Backend> block{expert{w.d, w.m}, options_for(w.k, w.threads), 42};
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
  if constexpr (!std::is_same_v<Backend, smear::default_backend>) {  // an anchor must compute what cpu computes
    smear::layer<expert, N> twin{expert{w.d, w.m}, options_for(w.k, w.threads), 42};
    twin.train(bw);
    std::vector<float> y2(size), dx2(size);
    twin.forward(tokens, y2, route);
    if (bw) twin.backward(dy, dx2);
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < size; ++i) {
      diff = std::max(diff, double(std::abs(y[i] - y2[i])) + (bw ? double(std::abs(dx[i] - dx2[i])) : 0.0));
      scale = std::max(scale, double(std::abs(y2[i])) + (bw ? double(std::abs(dx2[i])) : 0.0));
    }
    state.counters["diff_to_cpu"] = diff / scale;
    if (!(diff <= 1e-4 * scale)) {
      state.SkipWithError("the anchor's outputs differ from the cpu backend's");
      return;
    }
  }
  {
    std::optional<competing_process> competitor;
    if (loaded && !competitor.emplace().started()) {
      state.SkipWithError("could not start the competing process");
      return;
    }
    for (auto _ : state) {
      step();
      benchmark::DoNotOptimize(y.data());
      benchmark::DoNotOptimize(dx.data());
      benchmark::ClobberMemory();
    }
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
  // the small GEMMs an anchor's library could not take, as a share of its small GEMMs
  auto fallback_share = [&](const smear::backend::detail::anchor_counts& n) {
    state.counters["fallback_share"] =
        double(n.fallback.load()) / double(std::max<std::size_t>(1, n.fallback.load() + n.library.load()));
  };
#ifdef SMEAR_BENCH_XSMM
  if constexpr (std::is_same_v<Backend, smear::backend::xsmm>) fallback_share(smear::backend::detail::xsmm_stats());
#endif
#ifdef SMEAR_BENCH_ONEDNN
  if constexpr (std::is_same_v<Backend, smear::backend::onednn>) fallback_share(smear::backend::detail::onednn_stats());
#endif
  (void)fallback_share;
}

/// K callers share one SMEAR layer in evaluation mode, each forward through its own workspace
/// (smear::layer::workspace); every timed iteration runs `per_call` forwards in each caller.
void run_shared(benchmark::State& state, workload w, std::size_t callers) {
  constexpr std::size_t N = 8, per_call = 4;
  using expert = smear::adapter<float>;
  smear::layer<expert, N> block{expert{w.d, w.m}, options_for(kind::smear, 1), 42};
  block.train(false);
  const smear::layer<expert, N>& shared = block;
  const std::size_t size = w.batch * w.length * w.d;
  const std::vector<float> x = random_vector(size, 1);
  const auto tokens = smear::make_tokens<const float>(x.data(), w.batch, w.length, w.d);
  std::vector<smear::layer<expert, N>::workspace> ws(callers);
  std::vector<std::vector<float>> y(callers, std::vector<float>(size));
  auto calls = [&](std::size_t c) {
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
    smear::layer<expert, 1> block{expert{w.d, w.m}, {.threads = w.threads}, 42};
    block.train(false);
    const auto tokens = smear::make_tokens<const float>(x.data(), w.batch, 1, w.d);
    run([&] { block.forward(tokens, y); });
    return;
  }
  smear::layer_options o{.threads = w.threads};
  o.router.segment_length = segment;
  smear::layer<expert, N> block{expert{w.d, w.m}, o, 42};
  block.train(false);
  smear::layer<expert, N>::decoder dec{block, w.batch};
  run([&] { dec.step(x, y); });
  state.counters["merges_per_token"] =
      double(dec.merges()) / double((state.iterations() + 1) * segment);  // the warm-up's segment included
}

/// The GEMMs of a SMEAR block at this shape, as plain Eigen products over preallocated
/// matrices, the per-example ones spread over the pool's threads like the layer's (the merge
/// and bank products on one thread): the most the layer's GEMMs can reach through Eigen.
void run_gemm(benchmark::State& state, workload w) {
  const smear::backend::thread_limit limit(w.threads);
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
    smear::backend::parallel_for(smear::backend::cpu{}, w.batch,
                                 [&](std::size_t b, std::size_t t) { example(static_cast<Eigen::Index>(b), t); });
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

/// One n×n by n×n GEMM through Eigen on one thread, for reference.
void run_gemm_square(benchmark::State& state, std::size_t n) {
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/// `iterations` steps of 16 independent 512-bit (or 256-bit) FMA chains, in registers only;
/// returns a value that depends on all of them, so none is optimised away.
__attribute__((target("avx512f"))) float fma_loop_512(std::size_t iterations) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (std::size_t n = 0; n < iterations; ++n)
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  for (int i = 1; i < 16; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  float out[16];
  _mm512_storeu_ps(out, acc[0]);
  return out[0];
}
__attribute__((target("avx2,fma"))) float fma_loop_256(std::size_t iterations) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (std::size_t n = 0; n < iterations; ++n)
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  for (int i = 1; i < 12; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  float out[8];
  _mm256_storeu_ps(out, acc[0]);
  return out[0];
}
#endif

/// The FMA peak in GFLOP/s at the widest vector width this CPU runs, on `threads` threads.
void run_fma_peak(benchmark::State& state, std::size_t threads) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const bool wide = __builtin_cpu_supports("avx512f");
  if (!wide && !__builtin_cpu_supports("fma")) {
    state.SkipWithError("no FMA instructions on this CPU");
    return;
  }
  constexpr std::size_t iterations = 1 << 20;
  const double flops = wide ? 2.0 * 16 * 16 * iterations : 2.0 * 12 * 8 * iterations;
  const smear::backend::thread_limit limit(threads);
  std::vector<float> sink(threads);
  for (auto _ : state) {
    smear::backend::parallel_for(smear::backend::cpu{}, threads, [&](std::size_t i, std::size_t) {
      sink[i] = wide ? fma_loop_512(iterations) : fma_loop_256(iterations);
    });
    benchmark::DoNotOptimize(sink.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * double(threads) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(wide ? "512-bit FMA" : "256-bit FMA");
#else
  (void)threads;
  state.SkipWithError("the FMA peak loop is written for x86-64");
#endif
}

/// STREAM's triad a = b + s·c over three float arrays of 64 MB each (twice the largest L3 we
/// run on), split over T threads of the pool: the machine's memory bandwidth, in the same run.
void run_stream_triad(benchmark::State& state, std::size_t threads) {
  constexpr std::size_t n = std::size_t{16} << 20;
  std::vector<float> a(n, 0.0f), b(n, 1.0f), c(n, 2.0f);
  const smear::backend::thread_limit limit(threads);
  const auto triad = [&] {
    smear::backend::parallel_for(smear::backend::cpu{}, threads, [&](std::size_t t, std::size_t) {
      const std::size_t first = n * t / threads, last = n * (t + 1) / threads;
      for (std::size_t i = first; i < last; ++i) a[i] = b[i] + 3.0f * c[i];
    });
  };
  triad();  // pages touched outside the timing
  for (auto _ : state) {
    triad();
    benchmark::DoNotOptimize(a.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] =
      benchmark::Counter(3.0 * sizeof(float) * double(n) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void add(workload w, bool loaded = false) {
  auto* b = [&]() -> benchmark::internal::Benchmark* {
    const std::string label = (loaded ? "loaded/" : "") + w.label();
    if (w.k == kind::gemm) return benchmark::RegisterBenchmark(label.c_str(), run_gemm, w);
#ifdef SMEAR_BENCH_XSMM
    if (w.k == kind::xsmm && w.n == 8)
      return benchmark::RegisterBenchmark(label.c_str(), run_layer<8, smear::backend::xsmm>, w, loaded);
#endif
#ifdef SMEAR_BENCH_ONEDNN
    if (w.k == kind::onednn && w.n == 8)
      return benchmark::RegisterBenchmark(label.c_str(), run_layer<8, smear::backend::onednn>, w, loaded);
#endif
    if (w.k == kind::xsmm || w.k == kind::onednn) return nullptr;
    switch (w.n) {
      case 1: return benchmark::RegisterBenchmark(label.c_str(), run_layer<1>, w, loaded);
      case 4: return benchmark::RegisterBenchmark(label.c_str(), run_layer<4>, w, loaded);
      case 8: return benchmark::RegisterBenchmark(label.c_str(), run_layer<8>, w, loaded);
      case 16: return benchmark::RegisterBenchmark(label.c_str(), run_layer<16>, w, loaded);
      case 32: return benchmark::RegisterBenchmark(label.c_str(), run_layer<32>, w, loaded);
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
  // the anchors: SMEAR with the per-example GEMMs through libxsmm or oneDNN (bench/anchor_backends.hpp)
  for (kind k : {kind::xsmm, kind::onednn})
    for (std::size_t threads : {1, 2})
      for (auto md : {mode::fwd, mode::fwdbwd})
        for (dims s : {dims{768, 24}, dims{768, 64}, dims{512, 32}}) add({k, md, s.d, s.m, 8, 128, 32, threads});
  // the key workload on a shared machine: one competing process
  for (std::size_t threads : {1, 2})
    for (auto md : {mode::fwd, mode::fwdbwd})
      for (std::size_t batch : {32, 1})
        for (kind k : {kind::smear, kind::single}) add({k, md, 768, 64, k == kind::single ? 1u : 8u, 128, batch, threads}, true);
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
  benchmark::RegisterBenchmark("gemm_square/n:1024/threads:1", run_gemm_square, std::size_t{1024})
      ->UseRealTime()
      ->MeasureProcessCPUTime()
      ->Unit(benchmark::kMillisecond);
  for (std::size_t threads : {1, 2})
    benchmark::RegisterBenchmark(("fma_peak/threads:" + std::to_string(threads)).c_str(), run_fma_peak, threads)
        ->UseRealTime()
        ->MeasureProcessCPUTime()
        ->Unit(benchmark::kMillisecond);
  for (std::size_t threads : {1, 2})
    benchmark::RegisterBenchmark(("stream_triad/threads:" + std::to_string(threads)).c_str(), run_stream_triad,
                                 threads)
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
  benchmark::AddCustomContext("smear_cpu_kernels", smear::backend::cpu_kernels_report());
  benchmark::AddCustomContext("smear_threads", std::to_string(smear::backend::thread_pool::shared().size()));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
#ifdef SMEAR_BENCH_XSMM
  benchmark::AddCustomContext("libxsmm", LIBXSMM_VERSION);
#endif
#ifdef SMEAR_BENCH_ONEDNN
  if (const auto* v = dnnl_version())
    benchmark::AddCustomContext("onednn", std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
                                              std::to_string(v->patch));
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
