#pragma once
/// \file backend/cuda/experts.hpp
/// The experts' forward and backward for the whole padded batch at once, as the cuda backend
/// runs them: each example's GEMM with its own merged parameters is one strided-batched GEMM
/// over the padded length L (example b's parameters are row b of the merged [B, P] matrix),
/// and the element-wise work masks the padding rows.
///
/// `device_expert<Expert, Ctx>` exists for adapter, conv_adapter, linear and lora; another expert type is
/// rejected at compile time with a sentence. Contract of every specialisation (its members'
/// signatures are the concept smear::device_expert_kernel, smear/backend_concepts.hpp), for tokens
/// [B, L, ·] with per-example lengths (null: all rows valid):
/// - forward(ctx, merged, ps, x, lengths, B, L, y, saved) writes y's valid rows (padding rows are
///   zeroed by the layer afterwards);
/// - backward(ctx, merged, ps, x, lengths, B, L, saved, dy, dx, grads, scratch) expects dy's padding
///   rows to be zero, writes dx's valid rows (padding rows: anything) and every element of
///   grads [B, P] (row b = ∂ℓ/∂θ̄_b);
/// - optionally check_input(x, op), which throws before any work on tokens the expert cannot
///   run (the convolutional adapter: an example that is not a whole map).
/// Example b's parameters are at merged + b·ps (ps = P for merged rows, 0 for one expert shared
/// by the batch); grads rows are always P apart. Padding rows of x are multiplied by zero, so
/// they must be finite.

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/experts/adapter.hpp"
#include "smear/experts/conv_adapter.hpp"
#include "smear/experts/linear.hpp"
#include "smear/experts/lora.hpp"

namespace smear::device {

template <class Expert, class Ctx>
class device_expert {
  static_assert(!std::is_same_v<Expert, Expert>,
                "smear: the cuda backend runs smear::adapter, smear::conv_adapter, smear::linear and "
                "smear::lora experts; "
                "specialise smear::device::device_expert for another expert type");
};

/// The bottleneck both adapters compute, on an input already laid out as rows of `kin`
/// features [B, L, kin] (the tokens for the adapter, their unrolled k×k neighbourhoods for the
/// convolutional one): pre = in·W_d + b_d, act = act(pre), y = act·W_u [+ b_u]. Parameters
/// W_d [kin, m], b_d [m], W_u [m, d], b_u [d].
template <class T, class Ctx>
class bottleneck {
 public:
  bottleneck(std::size_t kin, std::size_t d, std::size_t m, std::size_t p, activation act, bool up_bias)
      : kin_(kin), d_(d), m_(m), p_(p), act_(act), up_bias_(up_bias) {}

  /// y ← f(in); pre and act are [B, L, m] (saved for backward).
  void forward(Ctx& ctx, const T* merged, std::size_t ps, const T* in, const std::int32_t* lengths, std::size_t B,
               std::size_t L, T* y, T* pre, T* act) const {
    ctx.gemm_batched(false, false, L, m_, kin_, T(1), in, kin_, L * kin_, merged, m_, ps, T(0), pre, m_, L * m_, B);
    detail::bias_activate(ctx.policy(), act_, pre, merged + kin_ * m_, ps, lengths, B, L, m_, act);
    ctx.gemm_batched(false, false, L, d_, m_, T(1), static_cast<const T*>(act), m_, L * m_, merged + up(), d_, ps,
                     T(0), y, d_, L * d_, B);
    if (up_bias_)
      detail::finish_rows(ctx.policy(), y, merged + up() + m_ * d_, ps, static_cast<const T*>(nullptr), lengths,
                          B, L, d_);
  }

  /// Every element of grads [B, P] and din [B, L, kin] (padding rows: anything) from dy;
  /// dh is [B, L, m] scratch.
  void backward(Ctx& ctx, const T* merged, std::size_t ps, const T* in, const std::int32_t* lengths, std::size_t B,
                std::size_t L, const T* pre, const T* act, const T* dy, T* din, T* grads, T* dh) const {
    // up-projection: dW_u = Hᵀ·dY, db_u = Σ dY, dH = dY·W_uᵀ
    ctx.gemm_batched(true, false, m_, d_, L, T(1), act, m_, L * m_, dy, d_, L * d_, T(0), grads + up(), d_, p_, B);
    if (up_bias_) detail::example_column_sums(ctx.policy(), dy, lengths, B, L, d_, grads + up() + m_ * d_, p_);
    ctx.gemm_batched(false, true, L, m_, d_, T(1), dy, d_, L * d_, merged + up(), d_, ps, T(0), dh, m_, L * m_, B);
    detail::activation_backward(ctx.policy(), act_, pre, lengths, B, L, m_, dh);
    // down-projection: dW_d = inᵀ·dA, db_d = Σ dA, d(in) = dA·W_dᵀ
    ctx.gemm_batched(true, false, kin_, m_, L, T(1), in, kin_, L * kin_, static_cast<const T*>(dh), m_, L * m_, T(0),
                     grads, m_, p_, B);
    detail::example_column_sums(ctx.policy(), static_cast<const T*>(dh), lengths, B, L, m_, grads + kin_ * m_, p_);
    ctx.gemm_batched(false, true, L, kin_, m_, T(1), static_cast<const T*>(dh), m_, L * m_, merged, m_, ps, T(0), din,
                     kin_, L * kin_, B);
  }

 private:
  std::size_t up() const { return kin_ * m_ + m_; }
  std::size_t kin_, d_, m_, p_;
  activation act_;
  bool up_bias_;
};

/// Bottleneck adapter: y = act(x·W_d + b_d)·W_u [+ b_u], batched over the examples.
template <class T, class Ctx>
class device_expert<adapter<T>, Ctx> {
 public:
  device_expert(const adapter<T>& e, Ctx&)
      : m_(e.bottleneck()),
        f_(e.input_dim(), e.input_dim(), m_, e.parameter_count(), e.options().act, e.options().up_bias) {}

  std::size_t saved_size(std::size_t B, std::size_t L) const { return 2 * B * L * m_; }
  std::size_t scratch_size(std::size_t B, std::size_t L) const { return B * L * m_; }

  void forward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t* lengths, std::size_t B,
               std::size_t L, T* y, T* saved) const {
    f_.forward(ctx, merged, ps, x, lengths, B, L, y, saved, saved + B * L * m_);
  }

  void backward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t* lengths, std::size_t B,
                std::size_t L, const T* saved, const T* dy, T* dx, T* grads, T* scratch) const {
    f_.backward(ctx, merged, ps, x, lengths, B, L, saved, saved + B * L * m_, dy, dx, grads, scratch);
  }

 private:
  std::size_t m_;
  bottleneck<T, Ctx> f_;
};

namespace detail {

/// A k×k "same" neighbourhood of an H×W map with d channels: cols[b, (i, j), (u, v, c)] =
/// x[b, (i + u − r, j + v − r), c], zero outside the map (r = k / 2).
struct conv_geometry {
  std::size_t h, w, d, k;
  SMEAR_HOST_DEVICE std::size_t taps() const { return k * k; }
  /// The position tap (u, v) of position (i, j) reads, or false outside the map.
  SMEAR_HOST_DEVICE bool source(std::size_t i, std::size_t j, std::size_t u, std::size_t v, std::size_t& pos) const {
    const std::size_t r = k / 2, si = i + u, sj = j + v;  // shifted by r
    if (si < r || si >= h + r || sj < r || sj >= w + r) return false;
    pos = (si - r) * w + (sj - r);
    return true;
  }
};

template <class T>
struct im2col_fn {
  const T* x;
  T* cols;
  conv_geometry g;
  SMEAR_HOST_DEVICE void operator()(std::size_t idx) const {
    const std::size_t c = idx % g.d, tap = (idx / g.d) % g.taps(), L = g.h * g.w, pos = (idx / (g.d * g.taps())) % L,
                      b = idx / (g.d * g.taps() * L);
    std::size_t from = 0;
    cols[idx] = g.source(pos / g.w, pos % g.w, tap / g.k, tap % g.k, from) ? x[(b * L + from) * g.d + c] : T(0);
  }
};

template <class T>
struct col2im_fn {
  const T* dcols;
  T* dx;
  conv_geometry g;
  SMEAR_HOST_DEVICE void operator()(std::size_t idx) const {
    const std::size_t c = idx % g.d, L = g.h * g.w, pos = (idx / g.d) % L, b = idx / (g.d * L);
    const std::size_t p = pos / g.w, q = pos % g.w, r = g.k / 2, kd = g.taps() * g.d;
    T s = T(0);  // over the positions (i, j) whose tap (u, v) reads (p, q): i = p + r − u
    for (std::size_t u = 0; u < g.k; ++u)
      for (std::size_t v = 0; v < g.k; ++v) {
        if (p + r < u || q + r < v || p + r - u >= g.h || q + r - v >= g.w) continue;
        const std::size_t at = (p + r - u) * g.w + (q + r - v);
        s += dcols[(b * L + at) * kd + (u * g.k + v) * g.d + c];
      }
    dx[idx] = s;
  }
};

}  // namespace detail

/// Convolutional adapter: its k×k neighbourhoods unrolled (im2col), then the adapter's
/// bottleneck with a [k²·d, m] down-projection; backward folds d(cols) back onto the map
/// (col2im, a gather per input element). Every example must be a whole map (L = H·W, no
/// padding), as on the host: forward checks the lengths first.
template <class T, class Ctx>
class device_expert<conv_adapter<T>, Ctx> {
 public:
  device_expert(const conv_adapter<T>& e, Ctx&)
      : e_(e), g_{e.height(), e.width(), e.input_dim(), e.options().kernel}, kd_(g_.taps() * g_.d),
        m_(e.bottleneck()), f_(kd_, g_.d, m_, e.parameter_count(), e.options().act, e.options().up_bias) {}

  std::size_t saved_size(std::size_t B, std::size_t L) const { return B * L * (kd_ + 2 * m_); }
  std::size_t scratch_size(std::size_t B, std::size_t L) const { return B * L * (kd_ + m_); }

  /// Throws shape_error, as conv_adapter does, when an example is not a whole H×W map.
  void check_input(const tokens<const T>& x, const char* op) const {
    for (std::size_t b = 0; b < x.batch; ++b) e_.check_rows(x.valid(b), op);
    if (x.length != e_.positions()) e_.check_rows(x.length, op);
  }

  void forward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t* lengths, std::size_t B,
               std::size_t L, T* y, T* saved) const {
    T* cols = saved;
    detail::for_each_index(ctx.policy(), B * L * kd_, detail::im2col_fn<T>{x, cols, g_});
    f_.forward(ctx, merged, ps, cols, lengths, B, L, y, cols + B * L * kd_, cols + B * L * (kd_ + m_));
  }

  void backward(Ctx& ctx, const T* merged, std::size_t ps, const T*, const std::int32_t* lengths, std::size_t B,
                std::size_t L, const T* saved, const T* dy, T* dx, T* grads, T* scratch) const {
    T* dcols = scratch + B * L * m_;
    f_.backward(ctx, merged, ps, saved, lengths, B, L, saved + B * L * kd_, saved + B * L * (kd_ + m_), dy, dcols,
                grads, scratch);
    detail::for_each_index(ctx.policy(), B * L * g_.d, detail::col2im_fn<T>{dcols, dx, g_});
  }

 private:
  conv_adapter<T> e_;
  detail::conv_geometry g_;
  std::size_t kd_, m_;
  bottleneck<T, Ctx> f_;
};

/// Linear expert: y = x·W [+ b].
template <class T, class Ctx>
class device_expert<linear<T>, Ctx> {
 public:
  device_expert(const linear<T>& e, Ctx&)
      : in_(e.input_dim()), out_(e.output_dim()), p_(e.parameter_count()), bias_(e.options().bias) {}

  std::size_t saved_size(std::size_t, std::size_t) const { return 0; }
  std::size_t scratch_size(std::size_t, std::size_t) const { return 0; }

  void forward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t* lengths, std::size_t B,
               std::size_t L, T* y, T*) const {
    ctx.gemm_batched(false, false, L, out_, in_, T(1), x, in_, L * in_, merged, out_, ps, T(0), y,
                     out_, L * out_, B);
    if (bias_)
      detail::finish_rows(ctx.policy(), y, merged + in_ * out_, ps, static_cast<const T*>(nullptr),
                          lengths, B, L, out_);
  }

  void backward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t* lengths, std::size_t B,
                std::size_t L, const T*, const T* dy, T* dx, T* grads, T*) const {
    ctx.gemm_batched(true, false, in_, out_, L, T(1), x, in_, L * in_, dy, out_, L * out_, T(0), grads,
                     out_, p_, B);
    if (bias_) detail::example_column_sums(ctx.policy(), dy, lengths, B, L, out_, grads + in_ * out_, p_);
    ctx.gemm_batched(false, true, L, in_, out_, T(1), dy, out_, L * out_, merged, out_, ps, T(0), dx,
                     in_, L * in_, B);
  }

 private:
  std::size_t in_, out_, p_;
  bool bias_;
};

/// LoRA expert: y = s·(x·A)·B + x·W₀ + b₀, the frozen W₀ and b₀ held on the device.
template <class T, class Ctx>
class device_expert<lora<T>, Ctx> {
 public:
  /// Reads the frozen map through the expert's own forward (with A = B = 0 it computes
  /// x·W₀ + b₀): rows of the identity give W₀ + b₀, a zero row gives b₀.
  device_expert(const lora<T>& e, Ctx& ctx)
      : in_(e.input_dim()), out_(e.output_dim()), r_(e.rank()), p_(e.parameter_count()), s_(e.scale()) {
    std::vector<T> zeros(p_, T(0)), eye((in_ + 1) * in_, T(0)), y((in_ + 1) * out_);
    for (std::size_t i = 0; i < in_; ++i) eye[i * in_ + i] = T(1);
    std::vector<T> saved(e.saved_size(in_ + 1));
    e.forward(backend::reference{}, std::span<const T>(zeros), matrix_ref<const T>{eye.data(), in_ + 1, in_},
              matrix_ref<T>{y.data(), in_ + 1, out_}, std::span<T>(saved));
    std::vector<T> w0(in_ * out_), b0(y.begin() + static_cast<std::ptrdiff_t>(in_ * out_), y.end());
    for (std::size_t i = 0; i < in_; ++i)
      for (std::size_t j = 0; j < out_; ++j) w0[i * out_ + j] = y[i * out_ + j] - b0[j];
    auto nonzero = [](const std::vector<T>& v) {
      for (T a : v)
        if (a != T(0)) return true;
      return false;
    };
    has_w0_ = nonzero(w0);
    has_b0_ = nonzero(b0);
    if (has_w0_) {
      w0_.reserve(w0.size(), "the lora expert's frozen weight");
      ctx.to_device(w0_.data(), w0.data(), w0.size());
    }
    if (has_b0_) {
      b0_.reserve(b0.size(), "the lora expert's frozen bias");
      ctx.to_device(b0_.data(), b0.data(), b0.size());
    }
    ctx.synchronize();
  }

  std::size_t saved_size(std::size_t B, std::size_t L) const { return B * L * r_; }
  std::size_t scratch_size(std::size_t B, std::size_t L) const { return B * L * r_; }

  void forward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t* lengths, std::size_t B,
               std::size_t L, T* y, T* saved) const {
    ctx.gemm_batched(false, false, L, r_, in_, T(1), x, in_, L * in_, merged, r_, ps, T(0), saved, r_,
                     L * r_, B);
    ctx.gemm_batched(false, false, L, out_, r_, s_, static_cast<const T*>(saved), r_, L * r_,
                     merged + in_ * r_, out_, ps, T(0), y, out_, L * out_, B);
    if (has_w0_) ctx.gemm(false, false, B * L, out_, in_, T(1), x, in_, w0_.data(), out_, T(1), y, out_);
    if (has_b0_)
      detail::finish_rows(ctx.policy(), y, b0_.data(), 0, static_cast<const T*>(nullptr), lengths, B, L,
                          out_);
  }

  void backward(Ctx& ctx, const T* merged, std::size_t ps, const T* x, const std::int32_t*, std::size_t B,
                std::size_t L, const T* saved, const T* dy, T* dx, T* grads, T* scratch) const {
    // dB = s·(xA)ᵀ·dY, d(xA) = s·dY·Bᵀ, dA = xᵀ·d(xA), dx = d(xA)·Aᵀ + dY·W₀ᵀ
    ctx.gemm_batched(true, false, r_, out_, L, s_, saved, r_, L * r_, dy, out_, L * out_, T(0),
                     grads + in_ * r_, out_, p_, B);
    ctx.gemm_batched(false, true, L, r_, out_, s_, dy, out_, L * out_, merged + in_ * r_, out_, ps, T(0),
                     scratch, r_, L * r_, B);
    ctx.gemm_batched(true, false, in_, r_, L, T(1), x, in_, L * in_, static_cast<const T*>(scratch), r_,
                     L * r_, T(0), grads, r_, p_, B);
    ctx.gemm_batched(false, true, L, in_, r_, T(1), static_cast<const T*>(scratch), r_, L * r_, merged, r_,
                     ps, T(0), dx, in_, L * in_, B);
    if (has_w0_) ctx.gemm(false, true, B * L, in_, out_, T(1), dy, out_, w0_.data(), out_, T(1), dx, in_);
  }

 private:
  std::size_t in_, out_, r_, p_;
  T s_;
  bool has_w0_ = false, has_b0_ = false;
  typename Ctx::template buffer<T> w0_, b0_;
};

}  // namespace smear::device
