// The cuda backend on a GPU: smear::layer<E, N, backend::cuda> against the reference layer for
// every expert type, forward and backward, odd sizes included, and its error paths (shapes,
// host pointers, the null stream, out-of-memory). Exits with 77 (ctest: skipped) when the
// machine has no CUDA device, so a machine without a GPU never reports it passed.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <smear/cuda.hpp>

#include "support/agreement.hpp"

using namespace smear;
using smear::testing::agreement_case;
using smear::testing::random_vector;

namespace {

struct gpu_memory {
  template <class T>
  device::device_buffer<T> upload(const std::vector<T>& v) const {
    device::device_buffer<T> b;
    b.reserve(v.size(), "a test tensor");
    REQUIRE(cudaMemcpy(b.data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
    return b;
  }
  template <class T>
  std::vector<T> download(const T* p, std::size_t n) const {
    std::vector<T> v(n);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
  }
};

struct stream_guard {
  cudaStream_t s = nullptr;
  stream_guard() { REQUIRE(cudaStreamCreate(&s) == cudaSuccess); }
  ~stream_guard() { cudaStreamDestroy(s); }
};

template <class Expert, std::size_t N>
void check(const Expert& proto, agreement_case c, std::uint64_t seed, layer_options opt = {}) {
  stream_guard stream;
  layer<Expert, N, backend::reference> ref{proto, opt, seed};
  layer<Expert, N, backend::cuda> fast{proto, opt, seed, stream.s};
  gpu_memory mem;
  testing::check_agreement(ref, fast, mem, c, seed);
}

}  // namespace

#define SMEAR_AGREEMENT_SUBJECT "cuda layer"
#include "support/agreement_cases.hpp"

TEST_CASE("cuda layer errors") {
  using E = adapter<float>;
  stream_guard stream;
  SUBCASE("the null stream is refused with a sentence") {
    CHECK_THROWS_WITH_AS((layer<E, 2, backend::cuda>{E{4, 2}, {}, 1, nullptr}),
                         doctest::Contains("the stream is null"), value_error);
  }
  SUBCASE("host pointers are refused") {
    layer<E, 2, backend::cuda> block{E{4, 2}, {}, 1, stream.s};
    std::vector<float> x(2 * 3 * 4), y(x.size());
    CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 4), y),
                         doctest::Contains("x points to host memory"), value_error);
  }
  SUBCASE("shapes") {
    layer<E, 2, backend::cuda> block{E{4, 2}, {}, 1, stream.s};
    gpu_memory mem;
    auto x = mem.upload(std::vector<float>(2 * 3 * 4, 0.5f));
    auto y = mem.upload(std::vector<float>(2 * 3 * 4));
    CHECK_THROWS_WITH_AS(block.forward(make_tokens<const float>(x.data(), 2, 3, 5), {y.data(), 24}),
                         doctest::Contains("[2, 3, 5], the experts expect d = 4"), shape_error);
    CHECK_THROWS_AS(block.backward({y.data(), 24}, {y.data(), 24}), state_error);
    block.forward(make_tokens<const float>(x.data(), 2, 3, 4), {y.data(), 24});
    CHECK_THROWS_WITH_AS(block.backward({y.data(), 24}, {y.data(), 23}), doctest::Contains("dx has 23"),
                         shape_error);
  }
  SUBCASE("out of device memory names the buffer and the bytes") {
    device::device_buffer<float> huge;
    const std::size_t n = std::size_t{1} << 46;  // 256 TiB
    try {
      huge.reserve(n, "a test buffer");
      FAIL("an allocation of 256 TiB succeeded");
    } catch (const device::out_of_memory& e) {
      CHECK(e.bytes() == n * sizeof(float));
      CHECK(std::string(e.what()).find("a test buffer") != std::string::npos);
      CHECK(std::string(e.what()).find(std::to_string(n * sizeof(float))) != std::string::npos);
    }
    // the device is still usable afterwards
    check<E, 2>(E{5, 2}, {}, 60);
  }
}

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    std::printf("no CUDA device on this machine: the GPU tests are skipped\n");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
