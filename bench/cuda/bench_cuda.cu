// Times the cuda backend's SMEAR block (adapter experts, float32) forward and forward+backward
// with CUDA events on the layer's stream, next to the time of its cuBLAS GEMMs alone (the same
// calls with the same shapes, no element-wise work): the backend's overhead over its GEMMs.
//
//   smear_cuda_bench [d m L B iterations]      (defaults: 768 64 128 32 50; N = 8 experts)
//
// Compare with bench/cuda/torch_smear.py (the same block in PyTorch eager) on the same GPU.

#include <cstdio>
#include <cstdlib>
#include <smear/cuda.hpp>
#include <vector>

namespace {

constexpr std::size_t N = 8;

void check(cudaError_t s, const char* what) {
  if (s != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(s));
    std::exit(1);
  }
}

struct timer {
  cudaStream_t stream;
  cudaEvent_t start{}, stop{};
  explicit timer(cudaStream_t s) : stream(s) {
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
  }
  ~timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  /// Mean milliseconds of f() over `iterations` calls, after 3 warm-up calls.
  template <class F>
  double mean_ms(int iterations, F&& f) {
    for (int i = 0; i < 3; ++i) f();
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    for (int i = 0; i < iterations; ++i) f();
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    return static_cast<double>(ms) / iterations;
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::size_t d = 768, m = 64, L = 128, B = 32;
  int iterations = 50;
  if (argc == 6) {
    d = std::strtoul(argv[1], nullptr, 10);
    m = std::strtoul(argv[2], nullptr, 10);
    L = std::strtoul(argv[3], nullptr, 10);
    B = std::strtoul(argv[4], nullptr, 10);
    iterations = std::atoi(argv[5]);
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: %s [d m L B iterations]\n", argv[0]);
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device on this machine: nothing to measure\n");
    return 77;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s; SMEAR block, adapter experts, float32: d = %zu, m = %zu, N = %zu, L = %zu, "
              "B = %zu, %d iterations\n", prop.name, d, m, N, L, B, iterations);

  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  using E = smear::adapter<float>;
  smear::layer<E, N, smear::backend::cuda> block{E{d, m}, {}, 1, stream};
  const std::size_t n = B * L * d, P = block.bank().parameter_count();
  smear::device::device_buffer<float> x, y, dy, dx;
  x.reserve(n, "x");
  y.reserve(n, "y");
  dy.reserve(n, "dy");
  dx.reserve(n, "dx");
  {
    smear::rng gen{7};
    std::vector<float> h(n);
    for (auto& v : h) v = static_cast<float>(gen.normal());
    check(cudaMemcpy(x.data(), h.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload");
    for (auto& v : h) v = static_cast<float>(0.01 * gen.normal());
    check(cudaMemcpy(dy.data(), h.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<std::int32_t> lengths(B, static_cast<std::int32_t>(L));
  auto xs = smear::make_tokens<const float>(x.data(), B, L, d, lengths);
  timer t{stream};
  std::printf("timing forward ...\n");
  const double fwd = t.mean_ms(iterations, [&] { block.forward(xs, {y.data(), n}); });
  std::printf("timing forward + backward ...\n");
  const double fwd_bwd = t.mean_ms(iterations, [&] {
    block.forward(xs, {y.data(), n});
    block.backward({dy.data(), n}, {dx.data(), n});
  });

  // The same cuBLAS calls alone: router logits, merge, two apply GEMMs; backward: four apply
  // GEMMs, the two bank GEMMs, two router GEMMs.
  smear::device::device_buffer<float> merged, grads, pre, act, feat, z, bank, bank_grad, rw;
  merged.reserve(B * P, "merged");
  grads.reserve(B * P, "grads");
  pre.reserve(B * L * m, "pre");
  act.reserve(B * L * m, "act");
  feat.reserve(B * d, "features");
  z.reserve(B * N, "logits");
  bank.reserve(N * P, "bank");
  bank_grad.reserve(N * P, "bank gradients");
  rw.reserve(N * d, "router weight");
  check(cudaMemset(bank.data(), 0, N * P * sizeof(float)), "memset");
  check(cudaMemset(merged.data(), 0, B * P * sizeof(float)), "memset");
  check(cudaMemset(act.data(), 0, B * L * m * sizeof(float)), "memset");
  auto& ctx = block.context();
  const std::size_t up = d * m + m;
  auto gemms_forward = [&] {
    ctx.gemm(false, true, B, N, d, 1.f, feat.data(), d, rw.data(), d, 0.f, z.data(), N);
    ctx.gemm(false, false, B, P, N, 1.f, z.data(), N, bank.data(), P, 0.f, merged.data(), P);
    ctx.gemm_batched(false, false, L, m, d, 1.f, x.data(), d, L * d, merged.data(), m, P, 0.f, pre.data(), m,
                     L * m, B);
    ctx.gemm_batched(false, false, L, d, m, 1.f, act.data(), m, L * m, merged.data() + up, d, P, 0.f, y.data(),
                     d, L * d, B);
  };
  auto gemms_backward = [&] {
    ctx.gemm_batched(true, false, m, d, L, 1.f, act.data(), m, L * m, dy.data(), d, L * d, 0.f,
                     grads.data() + up, d, P, B);
    ctx.gemm_batched(false, true, L, m, d, 1.f, dy.data(), d, L * d, merged.data() + up, d, P, 0.f, pre.data(),
                     m, L * m, B);
    ctx.gemm_batched(true, false, d, m, L, 1.f, x.data(), d, L * d, pre.data(), m, L * m, 0.f, grads.data(), m,
                     P, B);
    ctx.gemm_batched(false, true, L, d, m, 1.f, pre.data(), m, L * m, merged.data(), m, P, 0.f, dx.data(), d,
                     L * d, B);
    ctx.gemm(true, false, N, P, B, 1.f, z.data(), N, grads.data(), P, 1.f, bank_grad.data(), P);
    ctx.gemm(false, true, B, N, P, 1.f, grads.data(), P, bank.data(), P, 0.f, z.data(), N);
    ctx.gemm(true, false, N, d, B, 1.f, z.data(), N, feat.data(), d, 1.f, rw.data(), d);
    ctx.gemm(false, false, B, d, N, 1.f, z.data(), N, rw.data(), d, 0.f, feat.data(), d);
  };
  std::printf("timing the GEMMs alone ...\n");
  const double gemm_fwd = t.mean_ms(iterations, gemms_forward);
  const double gemm_fwd_bwd = t.mean_ms(iterations, [&] {
    gemms_forward();
    gemms_backward();
  });

  const double flops_fwd = 4.0 * double(B * L * d * m) + 2.0 * double(B * N * P);
  std::printf("\n%-22s %10s %12s %14s\n", "", "ms / call", "GEMMs alone", "overhead");
  std::printf("%-22s %10.4f %12.4f %13.2fx\n", "forward", fwd, gemm_fwd, fwd / gemm_fwd);
  std::printf("%-22s %10.4f %12.4f %13.2fx\n", "forward + backward", fwd_bwd, gemm_fwd_bwd,
              fwd_bwd / gemm_fwd_bwd);
  std::printf("forward: %.1f GFLOP/s (apply + merge FLOPs)\n", flops_fwd / (fwd * 1e6));
  cudaStreamDestroy(stream);
  return 0;
}
