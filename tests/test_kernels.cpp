// The cpu backend's GEMM against the reference one: every transpose combination, the direct
// kernels' register-tile and column-block edges, the dot-product and Eigen paths, strided
// operands, alpha and beta (beta = 0 must not read C), one thread and split over threads.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

#include "smear/backend/kernels.hpp"
#include "support/testing.hpp"


namespace {

using smear::matrix_ref;

/// One product C = alpha·op(A)·op(B) + beta·C of the given shape, through both backends.
/// The operands sit inside larger buffers (strides past their columns); C starts as NaN when
/// beta is 0, which the result must not see.
template <class T>
void check_gemm(std::size_t rows, std::size_t cols, std::size_t depth, bool ta, bool tb, T alpha, T beta,
                smear::rng& gen) {
  const std::size_t pad = 3;
  const std::size_t ar = ta ? depth : rows, ac = ta ? rows : depth;
  const std::size_t br = tb ? cols : depth, bc = tb ? depth : cols;
  const auto a = smear::testing::random_vector<T>(ar * (ac + pad), gen);
  const auto b = smear::testing::random_vector<T>(br * (bc + pad), gen);
  auto c_ref = smear::testing::random_vector<T>(rows * (cols + pad), gen);
  if (beta == T(0)) std::fill(c_ref.begin(), c_ref.end(), std::numeric_limits<T>::quiet_NaN());
  auto c_cpu = c_ref;
  const matrix_ref<const T> am{a.data(), ar, ac, ac + pad}, bm{b.data(), br, bc, bc + pad};
  smear::backend::gemm<T>(smear::backend::reference{}, ta, tb, alpha, am, bm, beta,
                          matrix_ref<T>{c_ref.data(), rows, cols, cols + pad});
  smear::backend::gemm<T>(smear::backend::cpu{}, ta, tb, alpha, am, bm, beta,
                          matrix_ref<T>{c_cpu.data(), rows, cols, cols + pad});
  double diff = 0, scale = 1;
  bool finite = true, padding_kept = true;
  for (std::size_t i = 0; i < rows; ++i) {
    for (std::size_t j = 0; j < cols; ++j) {
      const double r = c_ref[i * (cols + pad) + j], x = c_cpu[i * (cols + pad) + j];
      finite = finite && std::isfinite(x);
      diff = std::max(diff, std::abs(r - x));
      scale = std::max(scale, std::abs(r));
    }
    for (std::size_t j = cols; j < cols + pad; ++j)  // past C's columns: untouched
      padding_kept = padding_kept && (beta == T(0) || c_cpu[i * (cols + pad) + j] == c_ref[i * (cols + pad) + j]);
  }
  INFO("rows ", rows, " cols ", cols, " depth ", depth, " trans ", ta, tb, " alpha ", alpha, " beta ", beta);
  CHECK(finite);
  CHECK(padding_kept);
  CHECK(diff / scale < smear::testing::tolerance<T>() * std::sqrt(static_cast<double>(depth)));
}

template <class T>
void check_shapes(smear::rng& gen) {
  struct shape {
    std::size_t rows, cols, depth;
  };
  // tile edges (rows 1..13, columns off the SIMD width), one column block and several, the
  // dot-product path (deep A·Bᵀ whose Bᵀ is too large to copy), Eigen's path (depth > 1024),
  // and the shapes of SMEAR's own products
  const shape shapes[] = {{1, 1, 1},    {2, 3, 1},     {5, 17, 3},    {7, 33, 9},     {13, 64, 8},
                          {6, 100, 31}, {12, 48, 64},  {37, 300, 515}, {3, 600, 301}, {9, 40, 1100},
                          {32, 700, 8}, {8, 500, 32},  {21, 8, 2001}, {128, 64, 96},  {64, 96, 128},
                          {7, 208, 40}, {19, 1040, 300}, {128, 24, 768}, {768, 24, 128}};  // m = 24: a masked tail
  for (const auto& s : shapes)
    for (int t = 0; t < 4; ++t) {
      const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
      check_gemm<T>(s.rows, s.cols, s.depth, ta, tb, T(1), T(0), gen);
      check_gemm<T>(s.rows, s.cols, s.depth, ta, tb, T(-0.5), T(1), gen);
      check_gemm<T>(s.rows, s.cols, s.depth, ta, tb, T(2), T(0.25), gen);
    }
}

}  // namespace

TEST_CASE("cpu gemm equals the reference gemm for every transpose, edge and path") {
  smear::rng gen{11};
  SUBCASE("float") { check_shapes<float>(gen); }
  SUBCASE("double") { check_shapes<double>(gen); }
  SUBCASE("every instruction set this build and CPU have, forced") {
    namespace be = smear::backend;
    const be::cpu_isa before = be::selected_isa();
    for (be::cpu_isa isa : {be::cpu_isa::baseline, be::cpu_isa::avx2, be::cpu_isa::avx512}) {
      if (!be::available(isa)) {
        CHECK_THROWS_AS(be::select_isa(isa), smear::value_error);
        continue;
      }
      CAPTURE(be::name(isa));
      be::select_isa(isa);
      REQUIRE(be::selected_isa() == isa);
      check_shapes<float>(gen);
      check_shapes<double>(gen);
    }
    be::select_isa(before);
    MESSAGE(be::cpu_kernels_report());
  }
  SUBCASE("split over two and three threads") {
    // the test programs make a pool of three threads (tests/main.cpp)
    REQUIRE_MESSAGE(smear::backend::thread_pool::shared().size() >= 3, "run with SMEAR_NUM_THREADS=3");
    for (std::size_t threads : {2, 3}) {
      const smear::backend::thread_limit limit(threads);
      for (int t = 0; t < 4; ++t) {
        check_gemm<float>(128, 768, 64, (t & 1) != 0, (t & 2) != 0, 1.0f, 0.0f, gen);
        check_gemm<float>(32, 4000, 8, (t & 1) != 0, (t & 2) != 0, 1.0f, 1.0f, gen);
      }
    }
  }
}

TEST_CASE("SMEAR_CPU_ISA selects an available instruction set, and nothing wider") {
  namespace be = smear::backend;
  const char* wanted = std::getenv("SMEAR_CPU_ISA");
  const std::string text = wanted ? wanted : "";
  MESSAGE(be::cpu_kernels_report() << (wanted ? " with SMEAR_CPU_ISA=" + text : std::string()));
  for (be::cpu_isa isa : {be::cpu_isa::baseline, be::cpu_isa::avx2, be::cpu_isa::avx512})
    if (text == (isa == be::cpu_isa::baseline ? "baseline" : be::name(isa)) && be::available(isa))
      CHECK(be::selected_isa() == isa);
  if (!wanted) {  // the widest available
    CHECK(be::available(be::selected_isa()));
    if (be::available(be::cpu_isa::avx512)) CHECK(be::selected_isa() == be::cpu_isa::avx512);
  }
}

TEST_CASE("the direct kernels' transpose is a transpose, for every edge") {
  smear::rng gen{12};
  for (std::size_t rows : {1, 7, 16, 17, 40})
    for (std::size_t cols : {1, 5, 16, 33}) {
      const std::size_t lds = cols + 2;
      const auto src = smear::testing::random_vector<double>(rows * lds, gen);
      std::vector<double> dst(rows * cols);
      smear::backend::detail::direct::transpose(src.data(), rows, cols, lds, dst.data());
      for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < cols; ++j) REQUIRE(dst[j * rows + i] == src[i * lds + j]);
    }
}
