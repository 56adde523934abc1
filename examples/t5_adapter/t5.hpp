#pragma once
/// \file t5.hpp
/// A T5 encoder (Raffel et al. 2020; T5 v1.0 ReLU or v1.1 gated-GELU feed-forward) with forward
/// and backward passes, the Hugging Face tensor names, and a hook after each attention and
/// feed-forward sublayer where a routing block of adapter experts goes.
///
/// Per layer l, with RMSNorm(x) = x / sqrt(mean(x²) + ε) ⊙ g (no mean subtraction, no bias):
///   a = SelfAttention(RMSNorm(x)),  x ← x + hook_attn(a)
///   f = FeedForward(RMSNorm(x)),    x ← x + hook_ff(f)
/// and a final RMSNorm. Attention: per head h, softmax(q_h k_hᵀ + B_h) v_h, no 1/sqrt(d_kv) scale
/// (T5 folds it into the initialisation), B_h[i][j] = relative_attention_bias[bucket(j − i)][h]
/// from layer 0's table, shared by every layer. Feed-forward: ReLU: relu(x W_iᵀ) W_oᵀ;
/// gated-GELU: (gelu_tanh(x W_i0ᵀ) ⊙ x W_i1ᵀ) W_oᵀ. A hook that is null is the identity.
///
/// Examples are right-padded: example b holds lengths[b] valid tokens and attends over those
/// only (as Hugging Face's attention mask does); padding rows of every output are zero.

#include <smear/smear.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <smear/io/safetensors.hpp>

namespace t5ex {

/// Encoder hyper-parameters (names as in Hugging Face's T5Config).
struct t5_config {
  std::size_t vocab_size = 4000;
  std::size_t d_model = 64;
  std::size_t d_kv = 16;
  std::size_t num_heads = 4;
  std::size_t d_ff = 128;
  std::size_t num_layers = 2;
  std::size_t relative_attention_num_buckets = 32;
  std::size_t relative_attention_max_distance = 128;
  bool gated_gelu = false;  ///< false: "relu" (T5 v1.0); true: "gated-gelu" (T5 v1.1)
  float layer_norm_epsilon = 1e-6f;
  std::size_t inner() const { return num_heads * d_kv; }
};

/// T5's bidirectional relative position bucket of `rel` = key position − query position.
inline std::size_t relative_position_bucket(long rel, std::size_t num_buckets,
                                            std::size_t max_distance) {
  const long nb = static_cast<long>(num_buckets / 2);
  long ret = rel > 0 ? nb : 0;
  const long n = rel < 0 ? -rel : rel;
  const long max_exact = nb / 2;
  if (n < max_exact) return static_cast<std::size_t>(ret + n);
  const double scaled = std::log(static_cast<double>(n) / static_cast<double>(max_exact)) /
                        std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
                        static_cast<double>(nb - max_exact);
  const long large = std::min(max_exact + static_cast<long>(scaled), nb - 1);
  return static_cast<std::size_t>(ret + large);
}

/// What runs after a sublayer: y = hook(x) over a batch of token sequences (the routing block).
class sublayer_hook {
 public:
  virtual ~sublayer_hook() = default;
  virtual void forward(smear::tokens<const float> x, std::span<float> y) = 0;
  /// dx ← ∂ℓ/∂x given dy; accumulates the hook's own parameter gradients.
  virtual void backward(std::span<const float> dy, std::span<float> dx) = 0;
};

/// One named tensor inside the encoder's flat parameter vector.
struct tensor_slot {
  std::string name;
  std::vector<std::size_t> shape;
  std::size_t offset = 0;
  std::size_t size() const {
    std::size_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

/// The T5 encoder, its parameters in one flat vector (with the gradient beside it).
class t5_encoder {
 public:
  explicit t5_encoder(t5_config c) : cfg_(c) {
    if (c.d_model == 0 || c.num_heads == 0 || c.d_kv == 0 || c.d_ff == 0 || c.num_layers == 0 ||
        c.vocab_size == 0 || c.relative_attention_num_buckets < 4)
      throw smear::value_error("t5_encoder: every dimension must be positive (and at least 4 "
                               "relative attention buckets)");
    const std::size_t d = c.d_model, in = c.inner(), ff = c.d_ff;
    add("shared.weight", {c.vocab_size, d});
    for (std::size_t l = 0; l < c.num_layers; ++l) {
      const std::string p = "encoder.block." + std::to_string(l) + ".layer.";
      for (const char* w : {"q", "k", "v"}) add(p + "0.SelfAttention." + w + ".weight", {in, d});
      add(p + "0.SelfAttention.o.weight", {d, in});
      if (l == 0)
        add(p + "0.SelfAttention.relative_attention_bias.weight",
            {c.relative_attention_num_buckets, c.num_heads});
      add(p + "0.layer_norm.weight", {d});
      if (c.gated_gelu) {
        add(p + "1.DenseReluDense.wi_0.weight", {ff, d});
        add(p + "1.DenseReluDense.wi_1.weight", {ff, d});
      } else {
        add(p + "1.DenseReluDense.wi.weight", {ff, d});
      }
      add(p + "1.DenseReluDense.wo.weight", {d, ff});
      add(p + "1.layer_norm.weight", {d});
    }
    add("encoder.final_layer_norm.weight", {d});
    values_.assign(next_, 0.0f);
    grads_.assign(next_, 0.0f);
    hooks_.assign(2 * c.num_layers, nullptr);
  }

  const t5_config& config() const { return cfg_; }
  const std::vector<tensor_slot>& slots() const { return slots_; }
  std::span<float> values() { return values_; }
  std::span<float> gradients() { return grads_; }
  std::span<const float> values() const { return values_; }

  std::span<float> tensor(const std::string& name) { return std::span<float>(values_).subspan(slot(name).offset, slot(name).size()); }
  std::span<float> gradient(const std::string& name) { return std::span<float>(grads_).subspan(slot(name).offset, slot(name).size()); }
  const tensor_slot& slot(const std::string& name) const {
    for (const auto& s : slots_)
      if (s.name == name) return s;
    throw smear::value_error("t5_encoder: no tensor named '" + name + "'");
  }

  /// Hugging Face's T5 initialisation (factor 1): embeddings N(0, 1), q N(0, (d·d_kv)^-½),
  /// k, v N(0, d^-½), o N(0, (H·d_kv)^-½), wi N(0, d^-½), wo N(0, d_ff^-½), position bias
  /// N(0, d^-½), norms 1.
  void initialize(std::uint64_t seed) {
    smear::rng gen{seed};
    const auto d = static_cast<double>(cfg_.d_model);
    for (const auto& s : slots_) {
      double stdev = 1.0;
      const auto has = [&](const char* part) { return s.name.find(part) != std::string::npos; };
      if (has("layer_norm")) {
        std::fill_n(values_.begin() + static_cast<long>(s.offset), s.size(), 1.0f);
        continue;
      }
      if (has(".q.weight")) stdev = 1.0 / std::sqrt(d * static_cast<double>(cfg_.d_kv));
      else if (has(".k.weight") || has(".v.weight") || has("wi") || has("relative_attention_bias"))
        stdev = 1.0 / std::sqrt(d);
      else if (has(".o.weight")) stdev = 1.0 / std::sqrt(static_cast<double>(cfg_.inner()));
      else if (has(".wo.weight")) stdev = 1.0 / std::sqrt(static_cast<double>(cfg_.d_ff));
      for (std::size_t i = 0; i < s.size(); ++i)
        values_[s.offset + i] = static_cast<float>(stdev * gen.normal());
    }
  }

  /// Sets the hook after sublayer `2·layer` (attention) or `2·layer + 1` (feed-forward).
  void set_hook(std::size_t index, sublayer_hook* hook) { hooks_.at(index) = hook; }
  void zero_grad() { std::fill(grads_.begin(), grads_.end(), 0.0f); }

  /// Writes the parameters as safetensors (F32, Hugging Face names), with `metadata`.
  void save(const std::string& path, const std::vector<std::pair<std::string, std::string>>& metadata = {}) const {
    smear::safetensors_writer out;
    for (const auto& s : slots_)
      out.add(s.name, std::span<const float>(values_).subspan(s.offset, s.size()), s.shape);
    for (const auto& [key, value] : metadata) out.metadata(key, value);
    out.save(path);
  }
  /// Reads every tensor of this configuration from a safetensors file (a Hugging Face T5
  /// `model.safetensors` works: the decoder's tensors are ignored; F16 and BF16 are converted).
  /// Throws io_error naming a missing tensor or a wrong shape; nothing is changed then.
  void load(const std::string& path) {
    const auto f = smear::safetensors_file::open(path);
    std::vector<float> next(values_.size());
    for (const auto& s : slots_) {
      std::string name = s.name;
      if (!f.contains(name) && name == "shared.weight" && f.contains("encoder.embed_tokens.weight"))
        name = "encoder.embed_tokens.weight";
      if (f.at(name).shape != s.shape)
        throw smear::io_error(smear::detail::message("t5_encoder::load: '", path, "': tensor '", name,
                                                     "' has shape ", smear::detail::shape_string(f.at(name).shape),
                                                     ", this configuration needs ", smear::detail::shape_string(s.shape)));
      f.read(name, std::span<float>(next).subspan(s.offset, s.size()));
    }
    std::copy(next.begin(), next.end(), values_.begin());  // spans into values_ stay valid
  }

  /// out ← encoder(ids): ids [B, L] (right padded, lengths[b] valid), out [B, L, d_model].
  /// Keeps what backward needs: ids and lengths must stay alive until backward.
  void forward(std::span<const std::int32_t> ids, std::size_t B, std::size_t L,
               std::span<const std::int32_t> lengths, std::span<float> out) {
    const char* op = "t5_encoder::forward";
    const std::size_t d = cfg_.d_model;
    if (ids.size() != B * L || lengths.size() != B || out.size() != B * L * d)
      throw smear::shape_error(smear::detail::message(op, ": ids has ", ids.size(), " values, lengths ",
                                                      lengths.size(), ", out ", out.size(),
                                                      "; expected [B, L] = ", smear::detail::shape(B, L),
                                                      ", [B] and [B, L, d] = ", smear::detail::shape(B, L, d)));
    for (std::size_t b = 0; b < B; ++b) {
      if (lengths[b] < 1 || static_cast<std::size_t>(lengths[b]) > L)
        throw smear::value_error(smear::detail::message(op, ": example ", b, " has length ", lengths[b],
                                                        ", expected 1..", L));
      for (std::size_t t = 0; t < static_cast<std::size_t>(lengths[b]); ++t)
        if (ids[b * L + t] < 0 || static_cast<std::size_t>(ids[b * L + t]) >= cfg_.vocab_size)
          throw smear::value_error(smear::detail::message(op, ": token id ", ids[b * L + t], " at [", b,
                                                          ", ", t, "] is outside the vocabulary [0, ",
                                                          cfg_.vocab_size, ")"));
    }
    ids_ = ids;
    lengths_ = lengths;
    reserve(B, L);
    const float* emb = tensor_ptr("shared.weight");
    std::vector<float>& x = stream_;
    std::fill(x.begin(), x.begin() + static_cast<long>(B * L * d), 0.0f);
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t t = 0; t < n(b); ++t)
        std::copy_n(emb + static_cast<std::size_t>(ids[b * L + t]) * d, d, x.data() + (b * L + t) * d);
    for (std::size_t l = 0; l < cfg_.num_layers; ++l) {
      auto& s = saved_[l];
      s.x_in.assign(x.begin(), x.begin() + static_cast<long>(B * L * d));
      each([&](std::size_t b) { attention_forward(l, b); });
      apply_hook(2 * l, s.a, s.a_out);
      for (std::size_t i = 0; i < B * L * d; ++i) x[i] += s.a_out[i];
      s.x_mid.assign(x.begin(), x.begin() + static_cast<long>(B * L * d));
      each([&](std::size_t b) { ff_forward(l, b); });
      apply_hook(2 * l + 1, s.f, s.f_out);
      for (std::size_t i = 0; i < B * L * d; ++i) x[i] += s.f_out[i];
    }
    x_last_.assign(x.begin(), x.begin() + static_cast<long>(B * L * d));
    each([&](std::size_t b) {
      const std::size_t o = b * L * d;
      rms_forward(x_last_.data() + o, n(b), tensor_ptr("encoder.final_layer_norm.weight"),
                  rinv_final_.data() + b * L, out.data() + o);
      std::fill(out.data() + o + n(b) * d, out.data() + o + L * d, 0.0f);
    });
    pending_ = true;
  }

  /// Given ∂ℓ/∂out of the last forward, runs every hook's backward and, when `param_grads`,
  /// adds the encoder's parameter gradients to gradients() (a frozen backbone passes false:
  /// only the gradient flowing to the hooks is computed).
  void backward(std::span<const float> dout, bool param_grads) {
    const char* op = "t5_encoder::backward";
    if (!pending_) throw smear::state_error(smear::detail::message(op, ": no forward to go back through"));
    const std::size_t d = cfg_.d_model;
    if (dout.size() != B_ * L_ * d)
      throw smear::shape_error(smear::detail::message(op, ": dout has ", dout.size(),
                                                      " values, expected [B, L, d] = ", smear::detail::shape(B_, L_, d)));
    pending_ = false;
    param_grads_ = param_grads;
    const std::size_t threads = smear::backend::max_threads(smear::backend::cpu{});
    if (param_grads) {
      tgrads_.resize(threads);
      for (auto& g : tgrads_) g.assign(grads_.size(), 0.0f);
    }
    std::vector<float>& dx = dstream_;
    each([&](std::size_t b, std::size_t th) {
      const std::size_t o = b * L_ * d;
      rms_backward(x_last_.data() + o, n(b), tensor_ptr("encoder.final_layer_norm.weight"),
                   rinv_final_.data() + b * L_, dout.data() + o, dx.data() + o,
                   tgrad(th, "encoder.final_layer_norm.weight"), false);
      std::fill(dx.data() + o + n(b) * d, dx.data() + o + L_ * d, 0.0f);
    });
    for (std::size_t l = cfg_.num_layers; l-- > 0;) {
      auto& s = saved_[l];
      hook_backward(2 * l + 1, dx, s.df);
      each([&](std::size_t b, std::size_t th) { ff_backward(l, b, th); });
      hook_backward(2 * l, dx, s.da);
      each([&](std::size_t b, std::size_t th) { attention_backward(l, b, th); });
    }
    if (param_grads) {
      const std::size_t eo = slot("shared.weight").offset;
      for (std::size_t b = 0; b < B_; ++b)
        for (std::size_t t = 0; t < n(b); ++t) {
          float* g = tgrads_[0].data() + eo + static_cast<std::size_t>(ids_[b * L_ + t]) * d;
          const float* src = dx.data() + (b * L_ + t) * d;
          for (std::size_t j = 0; j < d; ++j) g[j] += src[j];
        }
      for (const auto& tg : tgrads_)
        for (std::size_t i = 0; i < grads_.size(); ++i) grads_[i] += tg[i];
    }
  }

  /// ∂ℓ/∂(embedded input) of the last backward: [B, L, d].
  std::span<const float> input_gradient() const { return {dstream_.data(), B_ * L_ * cfg_.d_model}; }

 private:
  struct layer_saved {
    std::vector<float> x_in, rinv1, n1, q, k, v, att, ctx, a, a_out, da;
    std::vector<float> x_mid, rinv2, n2, pre0, pre1, h, f, f_out, df;
  };

  void add(std::string name, std::vector<std::size_t> shape) {
    tensor_slot s{std::move(name), std::move(shape), next_};
    next_ += s.size();
    slots_.push_back(std::move(s));
  }
  const float* tensor_ptr(const std::string& name) const { return values_.data() + slot(name).offset; }
  float* tgrad(std::size_t thread, const std::string& name) {
    return param_grads_ ? tgrads_[thread].data() + slot(name).offset : nullptr;
  }
  std::string prefix(std::size_t l) const { return "encoder.block." + std::to_string(l) + ".layer."; }
  std::size_t n(std::size_t b) const { return static_cast<std::size_t>(lengths_[b]); }

  template <class F>
  void each(F&& f) {
    smear::backend::parallel_for(smear::backend::cpu{}, B_, [&](std::size_t b, std::size_t th) {
      if constexpr (std::is_invocable_v<F, std::size_t, std::size_t>) f(b, th);
      else f(b);
    });
  }

  void reserve(std::size_t B, std::size_t L) {
    B_ = B;
    L_ = L;
    const std::size_t d = cfg_.d_model, in = cfg_.inner(), ff = cfg_.d_ff, H = cfg_.num_heads;
    saved_.resize(cfg_.num_layers);
    for (auto& s : saved_) {
      for (auto* v : {&s.n1, &s.a, &s.a_out, &s.da, &s.n2, &s.f, &s.f_out, &s.df}) v->assign(B * L * d, 0.0f);
      for (auto* v : {&s.q, &s.k, &s.v, &s.ctx}) v->assign(B * L * in, 0.0f);
      for (auto* v : {&s.rinv1, &s.rinv2}) v->assign(B * L, 0.0f);
      s.att.assign(B * H * L * L, 0.0f);
      s.pre0.assign(B * L * ff, 0.0f);
      s.h.assign(B * L * ff, 0.0f);
      s.pre1.assign(cfg_.gated_gelu ? B * L * ff : 0, 0.0f);
    }
    stream_.assign(B * L * d, 0.0f);
    dstream_.assign(B * L * d, 0.0f);
    rinv_final_.assign(B * L, 0.0f);
    scratch_.resize(smear::backend::max_threads(smear::backend::cpu{}));
    // bucket of every (query, key) offset, shared by all layers
    buckets_.resize(2 * L + 1);
    for (std::size_t i = 0; i < 2 * L + 1; ++i)
      buckets_[i] = relative_position_bucket(static_cast<long>(i) - static_cast<long>(L),
                                             cfg_.relative_attention_num_buckets,
                                             cfg_.relative_attention_max_distance);
  }

  void apply_hook(std::size_t index, std::vector<float>& x, std::vector<float>& y) {
    if (hooks_[index] == nullptr) {
      y = x;
      return;
    }
    hooks_[index]->forward(smear::make_tokens<const float>(x.data(), B_, L_, cfg_.d_model, lengths_),
                           std::span<float>(y.data(), B_ * L_ * cfg_.d_model));
  }
  /// dsub ← ∂ℓ/∂(sublayer output) given dx = ∂ℓ/∂(residual stream after the add).
  void hook_backward(std::size_t index, const std::vector<float>& dx, std::vector<float>& dsub) {
    if (hooks_[index] == nullptr) {
      dsub = dx;
      return;
    }
    hooks_[index]->backward(std::span<const float>(dx.data(), B_ * L_ * cfg_.d_model),
                            std::span<float>(dsub.data(), B_ * L_ * cfg_.d_model));
  }

  void rms_forward(const float* x, std::size_t rows, const float* g, float* rinv, float* y) const {
    const std::size_t d = cfg_.d_model;
    for (std::size_t t = 0; t < rows; ++t) {
      double ss = 0;
      for (std::size_t j = 0; j < d; ++j) ss += double(x[t * d + j]) * x[t * d + j];
      const float r = static_cast<float>(1.0 / std::sqrt(ss / double(d) + double(cfg_.layer_norm_epsilon)));
      rinv[t] = r;
      for (std::size_t j = 0; j < d; ++j) y[t * d + j] = x[t * d + j] * r * g[j];
    }
  }
  /// dx (+)= ∂ℓ/∂x of y = x·r·g given dy; dg += Σ_t dy ⊙ x·r when dg is not null.
  void rms_backward(const float* x, std::size_t rows, const float* g, const float* rinv,
                    const float* dy, float* dx, float* dg, bool accumulate) const {
    const std::size_t d = cfg_.d_model;
    for (std::size_t t = 0; t < rows; ++t) {
      const float r = rinv[t];
      double dot = 0;
      for (std::size_t j = 0; j < d; ++j) dot += double(g[j]) * dy[t * d + j] * x[t * d + j];
      const float c = static_cast<float>(dot) * r * r * r / static_cast<float>(d);
      for (std::size_t j = 0; j < d; ++j) {
        const float v = r * g[j] * dy[t * d + j] - x[t * d + j] * c;
        dx[t * d + j] = accumulate ? dx[t * d + j] + v : v;
        if (dg != nullptr) dg[j] += dy[t * d + j] * x[t * d + j] * r;
      }
    }
  }

  using mref = smear::matrix_ref<float>;
  using cref = smear::matrix_ref<const float>;
  static void gemm(bool ta, bool tb, cref a, cref b, float beta, mref c) {
    smear::backend::gemm<float>(smear::backend::cpu{}, ta, tb, 1.0f, a, b, beta, c);
  }
  cref weight(const std::string& name, std::size_t rows, std::size_t cols) const {
    return {tensor_ptr(name), rows, cols};
  }
  mref wgrad(std::size_t th, const std::string& name, std::size_t rows, std::size_t cols) {
    return {tgrad(th, name), rows, cols};
  }

  void attention_forward(std::size_t l, std::size_t b) {
    auto& s = saved_[l];
    const std::size_t d = cfg_.d_model, in = cfg_.inner(), H = cfg_.num_heads, dk = cfg_.d_kv, L = L_;
    const std::size_t rows = n(b), o = b * L * d, oi = b * L * in;
    const std::string p = prefix(l) + "0.";
    rms_forward(s.x_in.data() + o, rows, tensor_ptr(p + "layer_norm.weight"), s.rinv1.data() + b * L,
                s.n1.data() + o);
    const cref n1{s.n1.data() + o, rows, d};
    gemm(false, true, n1, weight(p + "SelfAttention.q.weight", in, d), 0.0f, {s.q.data() + oi, rows, in});
    gemm(false, true, n1, weight(p + "SelfAttention.k.weight", in, d), 0.0f, {s.k.data() + oi, rows, in});
    gemm(false, true, n1, weight(p + "SelfAttention.v.weight", in, d), 0.0f, {s.v.data() + oi, rows, in});
    const float* rel = tensor_ptr(prefix(0) + "0.SelfAttention.relative_attention_bias.weight");
    for (std::size_t h = 0; h < H; ++h) {
      mref att{s.att.data() + (b * H + h) * L * L, rows, rows, L};
      gemm(false, true, cref{s.q.data() + oi + h * dk, rows, dk, in}, cref{s.k.data() + oi + h * dk, rows, dk, in},
           0.0f, att);
      for (std::size_t i = 0; i < rows; ++i) {
        float mx = -INFINITY;
        for (std::size_t j = 0; j < rows; ++j) {
          att(i, j) += rel[buckets_[j + L - i] * H + h];
          mx = std::max(mx, att(i, j));
        }
        double sum = 0;
        for (std::size_t j = 0; j < rows; ++j) {
          att(i, j) = std::exp(att(i, j) - mx);
          sum += att(i, j);
        }
        for (std::size_t j = 0; j < rows; ++j) att(i, j) = static_cast<float>(att(i, j) / sum);
      }
      gemm(false, false, cref(att), cref{s.v.data() + oi + h * dk, rows, dk, in}, 0.0f,
           mref{s.ctx.data() + oi + h * dk, rows, dk, in});
    }
    gemm(false, true, cref{s.ctx.data() + oi, rows, in}, weight(p + "SelfAttention.o.weight", d, in), 0.0f,
         {s.a.data() + o, rows, d});
    std::fill(s.a.data() + o + rows * d, s.a.data() + o + L * d, 0.0f);
  }

  void attention_backward(std::size_t l, std::size_t b, std::size_t th) {
    auto& s = saved_[l];
    const std::size_t d = cfg_.d_model, in = cfg_.inner(), H = cfg_.num_heads, dk = cfg_.d_kv, L = L_;
    const std::size_t rows = n(b), o = b * L * d, oi = b * L * in;
    const std::string p = prefix(l) + "0.";
    auto& w = scratch_[th];
    w.dctx.assign(rows * in, 0.0f);
    w.dq.assign(rows * in, 0.0f);
    w.dk.assign(rows * in, 0.0f);
    w.dv.assign(rows * in, 0.0f);
    w.datt.assign(rows * rows, 0.0f);
    w.dn.assign(rows * d, 0.0f);
    const cref da{s.da.data() + o, rows, d};
    // o: a = ctx·W_oᵀ
    gemm(false, false, da, weight(p + "SelfAttention.o.weight", d, in), 0.0f, {w.dctx.data(), rows, in});
    if (param_grads_) gemm(true, false, da, cref{s.ctx.data() + oi, rows, in}, 1.0f, wgrad(th, p + "SelfAttention.o.weight", d, in));
    const std::size_t rel_bias = slot(prefix(0) + "0.SelfAttention.relative_attention_bias.weight").offset;
    for (std::size_t h = 0; h < H; ++h) {
      const cref att{s.att.data() + (b * H + h) * L * L, rows, rows, L};
      const cref dctx{w.dctx.data() + h * dk, rows, dk, in};
      mref datt{w.datt.data(), rows, rows};
      // ctx_h = att·v_h
      gemm(false, true, dctx, cref{s.v.data() + oi + h * dk, rows, dk, in}, 0.0f, datt);
      gemm(true, false, att, dctx, 0.0f, mref{w.dv.data() + h * dk, rows, dk, in});
      // softmax: ds = att ⊙ (datt − rowsum(datt ⊙ att))
      for (std::size_t i = 0; i < rows; ++i) {
        double dot = 0;
        for (std::size_t j = 0; j < rows; ++j) dot += double(datt(i, j)) * att(i, j);
        for (std::size_t j = 0; j < rows; ++j) {
          datt(i, j) = att(i, j) * (datt(i, j) - static_cast<float>(dot));
          if (param_grads_) tgrads_[th][rel_bias + buckets_[j + L - i] * H + h] += datt(i, j);
        }
      }
      // scores = q_h·k_hᵀ
      gemm(false, false, cref(datt), cref{s.k.data() + oi + h * dk, rows, dk, in}, 0.0f,
           mref{w.dq.data() + h * dk, rows, dk, in});
      gemm(true, false, cref(datt), cref{s.q.data() + oi + h * dk, rows, dk, in}, 0.0f,
           mref{w.dk.data() + h * dk, rows, dk, in});
    }
    const cref n1{s.n1.data() + o, rows, d};
    for (auto [name, g] : {std::pair{"q", &w.dq}, std::pair{"k", &w.dk}, std::pair{"v", &w.dv}}) {
      const std::string wn = p + "SelfAttention." + name + ".weight";
      gemm(false, false, cref{g->data(), rows, in}, weight(wn, in, d), 1.0f, {w.dn.data(), rows, d});
      if (param_grads_) gemm(true, false, cref{g->data(), rows, in}, n1, 1.0f, wgrad(th, wn, in, d));
    }
    rms_backward(s.x_in.data() + o, rows, tensor_ptr(p + "layer_norm.weight"), s.rinv1.data() + b * L,
                 w.dn.data(), dstream_.data() + o, tgrad(th, p + "layer_norm.weight"), true);
  }

  void ff_forward(std::size_t l, std::size_t b) {
    auto& s = saved_[l];
    const std::size_t d = cfg_.d_model, ff = cfg_.d_ff, L = L_;
    const std::size_t rows = n(b), o = b * L * d, of = b * L * ff;
    const std::string p = prefix(l) + "1.";
    rms_forward(s.x_mid.data() + o, rows, tensor_ptr(p + "layer_norm.weight"), s.rinv2.data() + b * L,
                s.n2.data() + o);
    const cref n2{s.n2.data() + o, rows, d};
    if (cfg_.gated_gelu) {
      gemm(false, true, n2, weight(p + "DenseReluDense.wi_0.weight", ff, d), 0.0f, {s.pre0.data() + of, rows, ff});
      gemm(false, true, n2, weight(p + "DenseReluDense.wi_1.weight", ff, d), 0.0f, {s.pre1.data() + of, rows, ff});
      for (std::size_t i = 0; i < rows * ff; ++i)
        s.h[of + i] = smear::detail::activate(smear::activation::gelu, s.pre0[of + i]) * s.pre1[of + i];
    } else {
      gemm(false, true, n2, weight(p + "DenseReluDense.wi.weight", ff, d), 0.0f, {s.pre0.data() + of, rows, ff});
      for (std::size_t i = 0; i < rows * ff; ++i) s.h[of + i] = std::max(s.pre0[of + i], 0.0f);
    }
    gemm(false, true, cref{s.h.data() + of, rows, ff}, weight(p + "DenseReluDense.wo.weight", d, ff), 0.0f,
         {s.f.data() + o, rows, d});
    std::fill(s.f.data() + o + rows * d, s.f.data() + o + L * d, 0.0f);
  }

  void ff_backward(std::size_t l, std::size_t b, std::size_t th) {
    auto& s = saved_[l];
    const std::size_t d = cfg_.d_model, ff = cfg_.d_ff, L = L_;
    const std::size_t rows = n(b), o = b * L * d, of = b * L * ff;
    const std::string p = prefix(l) + "1.";
    auto& w = scratch_[th];
    w.dh.assign(rows * ff, 0.0f);
    w.dh1.assign(rows * ff, 0.0f);
    w.dn.assign(rows * d, 0.0f);
    const cref df{s.df.data() + o, rows, d};
    gemm(false, false, df, weight(p + "DenseReluDense.wo.weight", d, ff), 0.0f, {w.dh.data(), rows, ff});
    if (param_grads_)
      gemm(true, false, df, cref{s.h.data() + of, rows, ff}, 1.0f, wgrad(th, p + "DenseReluDense.wo.weight", d, ff));
    const cref n2{s.n2.data() + o, rows, d};
    if (cfg_.gated_gelu) {
      for (std::size_t i = 0; i < rows * ff; ++i) {
        const float x0 = s.pre0[of + i];
        w.dh1[i] = w.dh[i] * smear::detail::activate(smear::activation::gelu, x0);
        w.dh[i] *= s.pre1[of + i] * smear::detail::activate_derivative(smear::activation::gelu, x0);
      }
      for (auto [name, g] : {std::pair{"wi_0", &w.dh}, std::pair{"wi_1", &w.dh1}}) {
        const std::string wn = p + "DenseReluDense." + name + ".weight";
        gemm(false, false, cref{g->data(), rows, ff}, weight(wn, ff, d), 1.0f, {w.dn.data(), rows, d});
        if (param_grads_) gemm(true, false, cref{g->data(), rows, ff}, n2, 1.0f, wgrad(th, wn, ff, d));
      }
    } else {
      for (std::size_t i = 0; i < rows * ff; ++i)
        if (s.pre0[of + i] <= 0.0f) w.dh[i] = 0.0f;
      const std::string wn = p + "DenseReluDense.wi.weight";
      gemm(false, false, cref{w.dh.data(), rows, ff}, weight(wn, ff, d), 0.0f, {w.dn.data(), rows, d});
      if (param_grads_) gemm(true, false, cref{w.dh.data(), rows, ff}, n2, 1.0f, wgrad(th, wn, ff, d));
    }
    rms_backward(s.x_mid.data() + o, rows, tensor_ptr(p + "layer_norm.weight"), s.rinv2.data() + b * L,
                 w.dn.data(), dstream_.data() + o, tgrad(th, p + "layer_norm.weight"), true);
  }

  struct thread_scratch {
    std::vector<float> dctx, dq, dk, dv, datt, dn, dh, dh1;
  };

  t5_config cfg_;
  std::vector<tensor_slot> slots_;
  std::size_t next_ = 0;
  std::vector<float> values_, grads_;
  std::vector<std::vector<float>> tgrads_;
  std::vector<sublayer_hook*> hooks_;
  std::vector<layer_saved> saved_;
  std::vector<float> stream_, dstream_, x_last_, rinv_final_;
  std::vector<thread_scratch> scratch_;
  std::vector<std::size_t> buckets_;
  std::span<const std::int32_t> ids_{}, lengths_{};
  std::size_t B_ = 0, L_ = 0;
  bool pending_ = false, param_grads_ = false;
};

}  // namespace t5ex
