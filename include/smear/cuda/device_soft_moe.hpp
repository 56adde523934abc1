#pragma once
/// \file cuda/device_soft_moe.hpp
/// Soft MoE (smear/routing/soft_moe.hpp) as the cuda backend runs it, in an execution
/// context's memory: the unit tokens and Φ's unit columns and the logits (one GEMM), both
/// softmaxes as small functors, the dispatch and the combine as strided-batched GEMMs over
/// the examples (one per expert), the N experts on their B·s slot rows as one batched call of
/// the device expert (expert n is "example" n, its parameters row n of the bank), and the
/// backward through the same steps. Φ and scale are the host soft_moe's (the planner's
/// tensors live on the host): they go up with every forward, their gradients come back and
/// are added to the host's in backward.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "smear/backend/cuda/elementwise.hpp"
#include "smear/host_device.hpp"
#include "smear/tensor.hpp"
#include "smear/routing/soft_moe.hpp"

namespace smear::device {
namespace detail {

/// Row r of `count` values `step` apart from in + r·stride as a unit vector into out
/// (smear::detail::unit_vector), its norm into norm[r]; rows past their example's length
/// (with L > 0: rows of L per example) are set to 0.
template <class T>
struct unit_rows_fn {
  const T* in;
  T* out;
  T* norm;
  const std::int32_t* lengths;
  std::size_t L, count, step, stride;
  SMEAR_HOST_DEVICE void operator()(std::size_t r) const {
    const T* v = in + r * stride;
    T* o = out + r * stride;
    if (L > 0 && r % L >= rows_of(lengths, r / L, L)) {
      for (std::size_t i = 0; i < count; ++i) o[i * step] = T(0);
      return;
    }
    norm[r] = smear::detail::unit_vector(v, count, step, o);
  }
};

/// Its backward on valid rows (smear::detail::unit_vector_backward), added into out.
template <class T>
struct unit_rows_backward_fn {
  const T* in;
  const T* g;
  const T* norm;
  T* out;
  const std::int32_t* lengths;
  std::size_t L, count, step, stride;
  SMEAR_HOST_DEVICE void operator()(std::size_t r) const {
    if (L > 0 && r % L >= rows_of(lengths, r / L, L)) return;
    smear::detail::unit_vector_backward(in + r * stride, g + r * stride, norm[r], count, step, out + r * stride);
  }
};

/// D[b, ·, j] = softmax over example b's valid tokens of cosine·scale_j (padding rows 0); one
/// index per (b, j).
template <class T>
struct dispatch_softmax_fn {
  const T* cosine;
  const T* scale;
  T* D;
  const std::int32_t* lengths;
  std::size_t L, J;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t b = i / J, j = i % J, rows = rows_of(lengths, b, L);
    T* d = D + b * L * J + j;
    smear::detail::scaled_softmax(cosine + b * L * J + j, scale + j, 0, rows, J, d);
    for (std::size_t m = rows; m < L; ++m) d[m * J] = T(0);
  }
};

/// C[r, ·] = softmax over the slots of cosine[r, ·]·scale (padding rows 0); one index per row.
template <class T>
struct combine_softmax_fn {
  const T* cosine;
  const T* scale;
  T* C;
  const std::int32_t* lengths;
  std::size_t L, J;
  SMEAR_HOST_DEVICE void operator()(std::size_t r) const {
    T* o = C + r * J;
    if (r % L < rows_of(lengths, r / L, L))
      smear::detail::scaled_softmax(cosine + r * J, scale, 1, J, 1, o);
    else
      for (std::size_t j = 0; j < J; ++j) o[j] = T(0);
  }
};

/// column[b, j] = ⟨D[b, ·, j], ∂ℓ/∂D[b, ·, j]⟩ over example b's valid tokens.
template <class T>
struct dispatch_dot_fn {
  const T* D;
  const T* dD;
  T* column;
  const std::int32_t* lengths;
  std::size_t L, J;
  SMEAR_HOST_DEVICE void operator()(std::size_t i) const {
    const std::size_t b = i / J, j = i % J, rows = rows_of(lengths, b, L);
    T s = 0;
    for (std::size_t m = 0; m < rows; ++m) s += D[(b * L + m) * J + j] * dD[(b * L + m) * J + j];
    column[i] = s;
  }
};

/// Row r's ∂ℓ/∂S through both softmaxes; g (∂ℓ/∂D on entry) becomes ∂ℓ/∂S·scale, and
/// `share` gets ∂ℓ/∂S·cosine (both 0 on padding rows).
template <class T>
struct softmaxes_backward_fn {
  const T* D;
  const T* C;
  const T* dC;
  const T* column;
  const T* cosine;
  const T* scale;
  T* g;
  T* share;
  const std::int32_t* lengths;
  std::size_t L, J;
  SMEAR_HOST_DEVICE void operator()(std::size_t r) const {
    const std::size_t b = r / L, first = r * J;
    const bool valid = r % L < rows_of(lengths, b, L);
    T row = 0;
    for (std::size_t j = 0; j < J; ++j) row += C[first + j] * dC[first + j];
    for (std::size_t j = 0; j < J; ++j) {
      const std::size_t i = first + j;
      const T dS = valid ? D[i] * (g[i] - column[b * J + j]) + C[i] * (dC[i] - row) : T(0);
      share[i] = dS * cosine[i];
      g[i] = dS * scale[j];
    }
  }
};

}  // namespace detail

/// Soft MoE's work in `Ctx`'s memory for the host `soft_moe<T>` it mirrors, with the device
/// experts `Kernel` (device_expert<Expert, Ctx>).
template <class T, class Ctx>
class device_soft_moe {
  template <class V>
  using buf = typename Ctx::template buffer<V>;

 public:
  std::size_t workspace_bytes() const noexcept {
    std::size_t n = 0;
    for (const auto* b : {&params_, &grads_, &xhat_, &xnorm_, &phihat_, &phinorm_, &cosine_, &dispatch_, &combine_,
                          &slot_in_, &slot_out_, &saved_, &scratch_, &dtheta_, &dslot_in_, &dslot_out_, &dcombine_,
                          &dlogits_, &share_, &column_, &dxhat_, &dphihat_, &sums_})
      n += b->capacity();
    return sizeof(T) * n;
  }

  /// y ← Soft MoE of x ([B, L, d], lens on the device or null) with the bank [N, P] on the
  /// device; every value of y is written (padding rows 0).
  template <class Kernel>
  void forward(Ctx& ctx, const soft_moe<T>& host, const Kernel& kernel, const T* bank, std::size_t P, const T* x,
               const std::int32_t* lens, std::size_t B, std::size_t L, std::size_t dout, bool residual, T* y,
               const char* op) {
    reserve(host, kernel, B, L, dout, P);
    const std::size_t d = host.input_dim(), J = host.experts() * host.slots(), N = host.experts(), s = host.slots(),
                      BL = B * L;
    auto pol = ctx.policy();
    ctx.to_device(params_.data(), host.values().data(), host.values().size(), op);
    const T* scale = params_.data() + d * J;
    detail::for_each_index(pol, BL, detail::unit_rows_fn<T>{x, xhat_.data(), xnorm_.data(), lens, L, d, 1, d});
    detail::for_each_index(pol, J,
                           detail::unit_rows_fn<T>{params_.data(), phihat_.data(), phinorm_.data(), nullptr, 0, d, J, 1});
    ctx.gemm(false, false, BL, J, d, T(1), static_cast<const T*>(xhat_.data()), d, static_cast<const T*>(phihat_.data()),
             J, T(0), cosine_.data(), J);
    const T* cs = cosine_.data();
    detail::for_each_index(pol, B * J, detail::dispatch_softmax_fn<T>{cs, scale, dispatch_.data(), lens, L, J});
    detail::for_each_index(pol, BL, detail::combine_softmax_fn<T>{cs, scale, combine_.data(), lens, L, J});
    // x̃[n, b] = D_b[:, n]ᵀ·X_b (D's padding rows are 0)
    for (std::size_t n = 0; n < N; ++n)
      ctx.gemm_batched(true, false, s, d, L, T(1), static_cast<const T*>(dispatch_.data() + n * s), J, L * J, x, d,
                       L * d, T(0), slot_in_.data() + n * B * s * d, d, s * d, B);
    kernel.forward(ctx, bank, P, static_cast<const T*>(slot_in_.data()), nullptr, N, B * s, slot_out_.data(),
                   saved_.data());
    // y_b = Σ_n C_b[:, n]·õ[n, b] (C's padding rows are 0), then the residual
    for (std::size_t n = 0; n < N; ++n)
      ctx.gemm_batched(false, false, L, dout, s, T(1), static_cast<const T*>(combine_.data() + n * s), J, L * J,
                       static_cast<const T*>(slot_out_.data() + n * B * s * dout), dout, s * dout,
                       n == 0 ? T(0) : T(1), y, dout, L * dout, B);
    detail::finish_rows(pol, y, static_cast<const T*>(nullptr), 0, residual ? x : static_cast<const T*>(nullptr), lens,
                        B, L, dout);
  }

  /// Given g = ∂ℓ/∂y (padding rows 0) for the last forward: dx (every value), the bank's
  /// gradients (added on the device) and Φ's and scale's (added to the host's).
  template <class Kernel>
  void backward(Ctx& ctx, soft_moe<T>& host, const Kernel& kernel, const T* bank, T* bank_grads, std::size_t P,
                const T* x, const std::int32_t* lens, std::size_t B, std::size_t L, std::size_t dout, bool residual,
                const T* g, T* dx, const char* op) {
    const std::size_t d = host.input_dim(), J = host.experts() * host.slots(), N = host.experts(), s = host.slots(),
                      BL = B * L;
    auto pol = ctx.policy();
    const T *D = dispatch_.data(), *C = combine_.data(), *cs = cosine_.data(), *scale = params_.data() + d * J;
    for (std::size_t n = 0; n < N; ++n) {
      const T* out = slot_out_.data() + n * B * s * dout;
      ctx.gemm_batched(false, true, L, s, dout, T(1), g, dout, L * dout, out, dout, s * dout, T(0),
                       dcombine_.data() + n * s, J, L * J, B);
      ctx.gemm_batched(true, false, s, dout, L, T(1), C + n * s, J, L * J, g, dout, L * dout, T(0),
                       dslot_out_.data() + n * B * s * dout, dout, s * dout, B);
    }
    kernel.backward(ctx, bank, P, static_cast<const T*>(slot_in_.data()), nullptr, N, B * s,
                    static_cast<const T*>(saved_.data()), static_cast<const T*>(dslot_out_.data()), dslot_in_.data(),
                    dtheta_.data(), scratch_.data());
    detail::accumulate(pol, static_cast<const T*>(dtheta_.data()), N * P, bank_grads);
    // dx_b = Σ_n D_b[:, n]·∂ℓ/∂x̃[n, b] (+ g), ∂ℓ/∂D[:, n] = X_b·∂ℓ/∂x̃[n, b]ᵀ
    for (std::size_t n = 0; n < N; ++n) {
      const T* dslot = dslot_in_.data() + n * B * s * d;
      ctx.gemm_batched(false, false, L, d, s, T(1), D + n * s, J, L * J, dslot, d, s * d, n == 0 ? T(0) : T(1), dx, d,
                       L * d, B);
      ctx.gemm_batched(false, true, L, s, d, T(1), x, d, L * d, dslot, d, s * d, T(0), dlogits_.data() + n * s, J,
                       L * J, B);
    }
    detail::finish_rows(pol, dx, static_cast<const T*>(nullptr), 0, residual ? g : static_cast<const T*>(nullptr), lens,
                        B, L, d);
    detail::for_each_index(pol, B * J, detail::dispatch_dot_fn<T>{D, dlogits_.data(), column_.data(), lens, L, J});
    detail::for_each_index(pol, BL,
                           detail::softmaxes_backward_fn<T>{D, C, dcombine_.data(), column_.data(), cs, scale,
                                                            dlogits_.data(), share_.data(), lens, L, J});
    T* gphi = grads_.data();
    detail::fill(pol, gphi, d * J + J, T(0));
    detail::add_column_sums(pol, static_cast<const T*>(share_.data()), static_cast<const T*>(nullptr), BL, J,
                            gphi + d * J);
    const T* dA = dlogits_.data();
    ctx.gemm(false, true, BL, d, J, T(1), dA, J, static_cast<const T*>(phihat_.data()), J, T(0), dxhat_.data(), d);
    ctx.gemm(true, false, d, J, BL, T(1), static_cast<const T*>(xhat_.data()), d, dA, J, T(0), dphihat_.data(), J);
    detail::for_each_index(pol, BL, detail::unit_rows_backward_fn<T>{x, dxhat_.data(), xnorm_.data(), dx, lens, L, d, 1, d});
    detail::for_each_index(pol, J, detail::unit_rows_backward_fn<T>{params_.data(), dphihat_.data(), phinorm_.data(),
                                                                   gphi, nullptr, 0, d, J, 1});
    sums_host_.resize(d * J + J);
    ctx.to_host(sums_host_.data(), static_cast<const T*>(gphi), d * J + J, op);
    auto hg = host.gradients();
    for (std::size_t i = 0; i < hg.size(); ++i) hg[i] += sums_host_[i];
  }

  /// Each example's mean combine weight per expert, [B, N], on the host (waits for the stream).
  void expert_shares(Ctx& ctx, const soft_moe<T>& host, const std::int32_t* lens, std::span<const std::int32_t> lengths,
                     std::size_t B, std::size_t L, matrix_ref<T> out, const char* op) {
    const std::size_t J = host.experts() * host.slots(), s = host.slots();
    detail::example_column_sums(ctx.policy(), static_cast<const T*>(combine_.data()), lens, B, L, J, sums_.data(), J);
    sums_host_.resize(B * J);
    ctx.to_host(sums_host_.data(), static_cast<const T*>(sums_.data()), B * J, op);
    for (std::size_t b = 0; b < B; ++b) {
      const T rows = static_cast<T>(lengths.empty() ? L : static_cast<std::size_t>(lengths[b]));
      for (std::size_t n = 0; n < host.experts(); ++n) {
        T v = 0;
        for (std::size_t p = 0; p < s; ++p) v += sums_host_[b * J + n * s + p];
        out(b, n) = v / rows;
      }
    }
  }

 private:
  template <class Kernel>
  void reserve(const soft_moe<T>& host, const Kernel& kernel, std::size_t B, std::size_t L, std::size_t dout,
               std::size_t P) {
    const std::size_t d = host.input_dim(), N = host.experts(), J = N * host.slots(), BL = B * L,
                      rows = B * host.slots();
    params_.reserve(d * J + J, "Soft MoE's Φ and scale");
    grads_.reserve(d * J + J, "Soft MoE's gradients");
    xhat_.reserve(BL * d, "the unit tokens");
    dxhat_.reserve(BL * d, "the unit tokens' gradient");
    xnorm_.reserve(BL, "the tokens' norms");
    phihat_.reserve(d * J, "Φ's unit columns");
    dphihat_.reserve(d * J, "Φ's unit columns' gradient");
    phinorm_.reserve(J, "Φ's column norms");
    for (auto* b : {&cosine_, &dispatch_, &combine_, &dcombine_, &dlogits_, &share_})
      b->reserve(BL * J, "Soft MoE's [B, L, N·s] logits, weights and gradients");
    slot_in_.reserve(N * rows * d, "the slot inputs");
    dslot_in_.reserve(N * rows * d, "the slot inputs' gradient");
    slot_out_.reserve(N * rows * dout, "the slot outputs");
    dslot_out_.reserve(N * rows * dout, "the slot outputs' gradient");
    saved_.reserve(kernel.saved_size(N, rows), "the experts' saved activations on the slots");
    scratch_.reserve(kernel.scratch_size(N, rows), "the experts' scratch on the slots");
    dtheta_.reserve(N * P, "the experts' gradients on the slots");
    column_.reserve(B * J, "the dispatch's column dot products");
    sums_.reserve(B * J, "the combine weights' sums");
  }

  buf<T> params_, grads_, xhat_, xnorm_, phihat_, phinorm_, cosine_, dispatch_, combine_, slot_in_, slot_out_, saved_,
      scratch_, dtheta_, dslot_in_, dslot_out_, dcombine_, dlogits_, share_, column_, dxhat_, dphihat_, sums_;
  std::vector<T> sums_host_;
};

}  // namespace smear::device
