// The README's "CUDA backend" snippet, built by nvcc with the tests; it exits with 77 (ctest:
// skipped) where the machine has no GPU.
#include <cstdio>
#include <vector>

#include <smear/cuda.hpp>

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) return 77;

  constexpr std::size_t B = 4, L = 16, d = 64, n = B * L * d;
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  using expert = smear::adapter<float>;
  smear::layer<expert, 8, smear::backend::cuda> block{expert{d, 16}, {}, /*seed=*/42, stream};

  float *x, *y, *dy, *dx;  // device memory
  for (float** p : {&x, &y, &dy, &dx}) cudaMalloc(p, n * sizeof(float));
  std::vector<float> host(n, 0.5f);
  cudaMemcpy(x, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(dy, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  std::vector<std::int32_t> lengths{16, 9, 12, 3};  // on the host

  smear::device::adamw<float, smear::device::context> opt{block.parameters(), {.lr = 3e-4}, block.context()};
  block.forward(smear::make_tokens<const float>(x, B, L, d, lengths), {y, n});
  block.backward({dy, n}, {dx, n});  // gradients accumulate on the device
  auto p = block.routing();          // [B, 8], copied to the host (waits for the stream)
  block.download();                  // bank() and router() now hold the device's values and gradients
  std::printf("p(0, 0) = %.3f, first expert gradient %.3g\n", double(p(0, 0)),
              double(block.bank().gradients()(0, 0)));
  opt.step();                        // AdamW on the device, the host optimiser's update rule
  opt.zero_grad();
  for (float* q : {x, y, dy, dx}) cudaFree(q);
  cudaStreamDestroy(stream);
}
