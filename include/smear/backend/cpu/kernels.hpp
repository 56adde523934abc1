#pragma once
/// \file backend/cpu/kernels.hpp
/// The cpu backend's kernels: GEMMs through Eigen maps over the caller's buffers (no copies),
/// element-wise loops through xsimd, the batch spread over the threads of thread_pool.hpp.

#include <algorithm>
#include <cstddef>
#include <deque>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <xsimd/xsimd.hpp>

#include "smear/backend/cpu/direct_gemm.hpp"
#include "smear/backend/cpu/thread_pool.hpp"
#include "smear/backend/reference/kernels.hpp"

namespace smear::backend {
namespace detail {

template <class T>
using row_major = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using map = Eigen::Map<row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using const_map = Eigen::Map<const row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
map<T> eigen(matrix_ref<T> m) {
  return {m.data, static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols),
          Eigen::OuterStride<>(static_cast<Eigen::Index>(m.stride))};
}
template <class T>
const_map<T> eigen(matrix_ref<const T> m) {
  return {m.data, static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols),
          Eigen::OuterStride<>(static_cast<Eigen::Index>(m.stride))};
}

/// Applies the vector op `f(batch)` and the scalar op `g(x)` along one row of n values:
/// out[i] = f(in[i]) elementwise.
template <class T, class F, class G>
void transform(const T* in, T* out, std::size_t n, F&& f, G&& g) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  std::size_t i = 0;
  for (; i + w <= n; i += w) f(batch::load_unaligned(in + i)).store_unaligned(out + i);
  for (; i < n; ++i) out[i] = g(in[i]);
}

template <class T>
xsimd::batch<T> activate(activation act, const xsimd::batch<T>& x) {
  using batch = xsimd::batch<T>;
  switch (act) {
    case activation::silu: return x / (batch(T(1)) + xsimd::exp(-x));
    case activation::relu: return xsimd::max(x, batch(T(0)));
    case activation::gelu: {
      const batch u = T(smear::detail::gelu_k0) * (x + T(smear::detail::gelu_k1) * x * x * x);
      return T(0.5) * x * (batch(T(1)) + xsimd::tanh(u));
    }
    case activation::identity: return x;
  }
  return x;
}

template <class T>
xsimd::batch<T> activate_derivative(activation act, const xsimd::batch<T>& x) {
  using batch = xsimd::batch<T>;
  const batch one(T(1));
  switch (act) {
    case activation::silu: {
      const batch s = one / (one + xsimd::exp(-x));
      return s * (one + x * (one - s));
    }
    case activation::relu: return xsimd::select(x > batch(T(0)), one, batch(T(0)));
    case activation::gelu: {
      const batch u = T(smear::detail::gelu_k0) * (x + T(smear::detail::gelu_k1) * x * x * x);
      const batch t = xsimd::tanh(u);
      const batch du = T(smear::detail::gelu_k0) * (one + T(3 * smear::detail::gelu_k1) * x * x);
      return T(0.5) * (one + t) + T(0.5) * x * (one - t * t) * du;
    }
    case activation::identity: return one;
  }
  return one;
}

}  // namespace detail

namespace detail {

/// Room the GEMMs grow once and reuse: Eigen's packing buffers (which Eigen's own products put
/// on the heap at every call over 128 KiB) and a transposed B. A chunk of a job uses the room
/// its caller keeps for that chunk (run_chunks), whichever thread runs it, and other work
/// that of its thread: the same calls after a warm-up at the same shapes and thread count find
/// it grown and allocate nothing.
struct scratch {
  using bytes = std::vector<unsigned char, Eigen::aligned_allocator<unsigned char>>;
  bytes pack_a, pack_b, transposed;

  /// Room for n values of T at the start of `b` (grown if needed).
  template <class T>
  static T* room(bytes& b, std::size_t n) {
    if (b.size() < n * sizeof(T)) b.resize(n * sizeof(T));
    return reinterpret_cast<T*>(b.data());
  }
};

/// The room of the chunk this thread is running, or null outside a job.
inline scratch*& chunk_room() noexcept {
  thread_local scratch* room = nullptr;
  return room;
}

/// The room of this thread's work outside a job (made at its first use: a thread that only
/// runs chunks never makes one).
inline scratch& own_room() {
  thread_local scratch own;
  return own;
}

/// The room for the work this thread runs now.
inline scratch& scratch_here() {
  scratch* room = chunk_room();
  return room != nullptr ? *room : own_room();
}

/// Runs body(c) for c in [0, chunks) on the pool, chunk c with the room that this calling
/// thread keeps for its chunk c.
template <class F>
void run_chunks(std::size_t chunks, F& body) {
  thread_local std::deque<scratch> rooms;
  while (rooms.size() < chunks) rooms.emplace_back();
  std::deque<scratch>& callers = rooms;  // this thread's: a worker's body must not name its own
  auto task = [&](std::size_t c) {
    const scoped_set<scratch*> room(chunk_room(), &callers[c]);
    body(c);
  };
  thread_pool::shared().run(chunks, task);
}

/// Eigen's cache blocking over caller-owned packing buffers.
template <class T>
class gemm_blocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  gemm_blocking(Eigen::Index mc, Eigen::Index nc, Eigen::Index kc) {
    Eigen::internal::computeProductBlockingSizes<T, T, 1, Eigen::Index>(kc, mc, nc, Eigen::Index{1});
    this->m_mc = mc;
    this->m_nc = nc;
    this->m_kc = kc;
    scratch& room = scratch_here();
    this->m_blockA = scratch::room<T>(room.pack_a, static_cast<std::size_t>(mc * kc));
    this->m_blockB = scratch::room<T>(room.pack_b, static_cast<std::size_t>(kc * nc));
  }
};

/// C += alpha · op(A) · op(B) through Eigen's blocked kernel, row-major C, on this thread.
template <class T, int LhsOrder, int RhsOrder>
void gemm_blocked(T alpha, const T* a, std::size_t lda, const T* b, std::size_t ldb, matrix_ref<T> c,
                  std::size_t depth) {
  using Eigen::Index;
  // Eigen runs a row-major product as the column-major product of the transposes, so its
  // blocking is that of [cols, depth]·[depth, rows].
  gemm_blocking<T> blocking(static_cast<Index>(c.cols), static_cast<Index>(c.rows), static_cast<Index>(depth));
  Eigen::internal::general_matrix_matrix_product<Index, T, LhsOrder, false, T, RhsOrder, false, Eigen::RowMajor,
                                                 1>::run(static_cast<Index>(c.rows), static_cast<Index>(c.cols),
                                                         static_cast<Index>(depth), a, static_cast<Index>(lda), b,
                                                         static_cast<Index>(ldb), c.data, 1,
                                                         static_cast<Index>(c.stride), alpha, blocking, nullptr);
}

/// The direct kernel (direct_gemm.hpp) takes op(A)·B up to this depth, and a shallower A·Bᵀ
/// when Bᵀ takes at most this many bytes; the rest go to Eigen's packed kernel.
inline constexpr std::size_t direct_depth = 1024;
inline constexpr std::size_t direct_transpose_bytes = std::size_t{512} << 10;
/// A·Bᵀ at least this deep runs as dot products (direct::gemm_nt).
inline constexpr std::size_t direct_dot_depth = 256;

/// C = alpha · op(A) · op(B) + beta · C on this thread (the gemm contract below).
template <class T>
void gemm_serial(bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a, matrix_ref<const T> b, T beta,
                 matrix_ref<T> c) {
  if (c.rows == 0 || c.cols == 0) return;
  const std::size_t depth = trans_a ? a.rows : a.cols;
  const bool vector_like = c.rows == 1 || c.cols == 1 || c.rows + c.cols + depth < 20;
  // The direct kernels, which neither pack the operands nor zero-fill C first: op(A)·B with B
  // read in place and A·Bᵀ through a transposed copy of a small B (a C narrower than one SIMD
  // batch stays with Eigen); a deeper A·Bᵀ as dot products.
  const bool small_bt = depth * c.cols * sizeof(T) <= direct_transpose_bytes;
  if (!vector_like && depth > 0 && depth <= direct_depth && c.cols >= direct::lanes<T>() &&
      !(trans_a && trans_b) && (!trans_b || small_bt)) {
    const T* bp = b.data;
    std::size_t ldb = b.stride;
    if (trans_b) {
      T* const transposed = scratch::room<T>(scratch_here().transposed, depth * c.cols);
      direct::transpose(b.data, c.cols, depth, b.stride, transposed);
      bp = transposed;
      ldb = c.cols;
    }
    if (trans_a)
      direct::gemm<T, true>(c.rows, c.cols, depth, a.data, a.stride, bp, ldb, c.data, c.stride, alpha, beta);
    else
      direct::gemm<T, false>(c.rows, c.cols, depth, a.data, a.stride, bp, ldb, c.data, c.stride, alpha, beta);
    return;
  }
  if (!vector_like && depth >= direct_dot_depth && trans_b && !trans_a) {
    direct::gemm_nt<T>(c.rows, c.cols, depth, a.data, a.stride, b.data, b.stride, c.data, c.stride, alpha, beta);
    return;
  }
  auto cm = eigen(c);
  if (beta == T(0)) cm.setZero();
  else if (beta != T(1)) cm *= beta;
  if (depth == 0) return;
  // Matrix-vector and tiny products: Eigen's own GEMV or small-product paths, called on the
  // plain maps (an `alpha * A` expression would make Eigen copy a row into a heap temporary).
  if (vector_like) {
    const auto am = eigen(a);
    const auto bm = eigen(b);
    auto run = [&](const auto& x, const auto& y) {
      using x_type = std::remove_cvref_t<decltype(x)>;
      using y_type = std::remove_cvref_t<decltype(y)>;
      Eigen::internal::generic_product_impl<x_type, y_type, Eigen::DenseShape, Eigen::DenseShape,
                                            Eigen::GemmProduct>::scaleAndAddTo(cm, x, y, alpha);
    };
    if (!trans_a && !trans_b) run(am, bm);
    else if (trans_a && !trans_b) run(am.transpose(), bm);
    else if (!trans_a && trans_b) run(am, bm.transpose());
    else run(am.transpose(), bm.transpose());
    return;
  }
  // op(A) of a row-major A is row-major; its transpose is column-major with the same stride.
  if (!trans_a && !trans_b)
    gemm_blocked<T, Eigen::RowMajor, Eigen::RowMajor>(alpha, a.data, a.stride, b.data, b.stride, c, depth);
  else if (trans_a && !trans_b)
    gemm_blocked<T, Eigen::ColMajor, Eigen::RowMajor>(alpha, a.data, a.stride, b.data, b.stride, c, depth);
  else if (!trans_a && trans_b)
    gemm_blocked<T, Eigen::RowMajor, Eigen::ColMajor>(alpha, a.data, a.stride, b.data, b.stride, c, depth);
  else
    gemm_blocked<T, Eigen::ColMajor, Eigen::ColMajor>(alpha, a.data, a.stride, b.data, b.stride, c, depth);
}

/// Below this many multiply-adds a GEMM stays on one thread.
inline constexpr double gemm_parallel_work = 1 << 21;

}  // namespace detail

/// How many threads the cpu backend's work started here may use: the pool's, or fewer under a
/// thread_limit; 1 inside a job of the pool (its chunks run on one thread each).
inline std::size_t max_threads(cpu) {
  if (detail::inside_job()) return 1;
  const std::size_t pool = thread_pool::shared().size(), limit = detail::thread_limit_value();
  return limit == 0 ? pool : std::min(pool, limit);
}

/// A large GEMM is split over the threads by blocks of C's rows or columns (whichever is
/// longer), each block run by the serial kernel: this is what keeps both cores busy when the
/// batch is smaller than the thread count, and what spreads the merge and bank GEMMs. The
/// split depends only on the thread count, so for a fixed count the results do not depend on
/// which thread ran which block. Inside a job of the pool (the per-example loop) it is serial.
template <class T>
void gemm(cpu be, bool trans_a, bool trans_b, T alpha, matrix_ref<const T> a, matrix_ref<const T> b,
          T beta, matrix_ref<T> c) {
  const std::size_t depth = trans_a ? a.rows : a.cols;
  const std::size_t parts = max_threads(be);
  const std::size_t longest = c.rows >= c.cols ? c.rows : c.cols;
  if (parts > 1 && longest >= 2 * 16 &&
      double(c.rows) * double(c.cols) * double(depth) >= detail::gemm_parallel_work) {
    const bool by_rows = c.rows >= c.cols;
    // blocks of whole 16-element groups: threads do not share cache lines of C
    const std::size_t groups = (longest + 15) / 16;
    auto block = [&](std::size_t t) {
      const std::size_t first = std::min(longest, groups * t / parts * 16);
      const std::size_t last = std::min(longest, groups * (t + 1) / parts * 16);
      if (last <= first) return;
      const std::size_t n = last - first;
      if (by_rows) {
        // rows [first, last) of C come from rows of op(A)
        const matrix_ref<const T> as =
            trans_a ? matrix_ref<const T>{a.data + first, a.rows, n, a.stride} : a.middle_rows(first, n);
        detail::gemm_serial<T>(trans_a, trans_b, alpha, as, b, beta, c.middle_rows(first, n));
      } else {
        // columns [first, last) of C come from columns of op(B)
        const matrix_ref<const T> bs =
            trans_b ? b.middle_rows(first, n) : matrix_ref<const T>{b.data + first, b.rows, n, b.stride};
        detail::gemm_serial<T>(trans_a, trans_b, alpha, a, bs, beta, matrix_ref<T>{c.data + first, c.rows, n, c.stride});
      }
    };
    detail::run_chunks(parts, block);
    return;
  }
  detail::gemm_serial<T>(trans_a, trans_b, alpha, a, b, beta, c);
}

template <class T>
void bias_activate(cpu, activation act, matrix_ref<T> pre, std::span<const T> bias,
                   matrix_ref<T> out) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  for (std::size_t i = 0; i < pre.rows; ++i) {
    T* p = pre.data + i * pre.stride;
    T* o = out.data + i * out.stride;
    std::size_t j = 0;
    for (; j + w <= pre.cols; j += w) {
      batch x = batch::load_unaligned(p + j);
      if (!bias.empty()) x += batch::load_unaligned(bias.data() + j);
      x.store_unaligned(p + j);
      detail::activate(act, x).store_unaligned(o + j);
    }
    for (; j < pre.cols; ++j) {
      if (!bias.empty()) p[j] += bias[j];
      o[j] = smear::detail::activate(act, p[j]);
    }
  }
}

template <class T>
void add_to_rows(cpu, matrix_ref<T> c, std::span<const T> v) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  for (std::size_t i = 0; i < c.rows; ++i) {
    T* r = c.data + i * c.stride;
    std::size_t j = 0;
    for (; j + w <= c.cols; j += w)
      (batch::load_unaligned(r + j) + batch::load_unaligned(v.data() + j)).store_unaligned(r + j);
    for (; j < c.cols; ++j) r[j] += v[j];
  }
}

template <class T>
void activation_backward(cpu, activation act, matrix_ref<const T> pre, matrix_ref<T> grad) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  for (std::size_t i = 0; i < grad.rows; ++i) {
    const T* p = pre.data + i * pre.stride;
    T* g = grad.data + i * grad.stride;
    std::size_t j = 0;
    for (; j + w <= grad.cols; j += w)
      (batch::load_unaligned(g + j) * detail::activate_derivative(act, batch::load_unaligned(p + j)))
          .store_unaligned(g + j);
    for (; j < grad.cols; ++j) g[j] *= smear::detail::activate_derivative(act, p[j]);
  }
}

/// out = Σ_i a.row(i), row after row: a streams through once, out stays in L1.
template <class T>
void column_sums(cpu, matrix_ref<const T> a, std::span<T> out) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  std::fill(out.begin(), out.end(), T(0));
  for (std::size_t i = 0; i < a.rows; ++i) {
    const T* r = a.data + i * a.stride;
    std::size_t j = 0;
    for (; j + w <= a.cols; j += w)
      (batch::load_unaligned(out.data() + j) + batch::load_unaligned(r + j)).store_unaligned(out.data() + j);
    for (; j < a.cols; ++j) out[j] += r[j];
  }
}

template <class T>
void axpy(cpu, T alpha, std::span<const T> x, std::span<T> y) {
  using batch = xsimd::batch<T>;
  constexpr std::size_t w = batch::size;
  const batch a(alpha);
  std::size_t i = 0;
  for (; i + w <= x.size(); i += w)
    xsimd::fma(a, batch::load_unaligned(x.data() + i), batch::load_unaligned(y.data() + i))
        .store_unaligned(y.data() + i);
  for (; i < x.size(); ++i) y[i] += alpha * x[i];
}

/// f(i, chunk) for every i in [0, n): the indices split into max_threads() contiguous chunks
/// (fewer when n is smaller), chunk c run in order by one thread. The split depends only on the
/// thread count, so a task may keep per-chunk state (chunk < max_threads()) and results are
/// deterministic for a fixed count, whichever thread ran a chunk and even when the pool was
/// busy and the caller ran every chunk itself.
template <class F>
void parallel_for(cpu be, std::size_t n, F&& f) {
  const std::size_t chunks = std::min(n, max_threads(be));
  if (chunks <= 1) {
    for (std::size_t i = 0; i < n; ++i) f(i, std::size_t{0});
    return;
  }
  auto chunk = [&](std::size_t c) {
    for (std::size_t i = n * c / chunks, last = n * (c + 1) / chunks; i < last; ++i) f(i, c);
  };
  detail::run_chunks(chunks, chunk);
}

}  // namespace smear::backend
