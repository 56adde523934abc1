#pragma once
/// \file pretrain.hpp
/// The T5-adapter example's backbone pre-training: denoising by masked-token prediction, with
/// the tied embedding as the output layer, on the training text.

#include <smear/smear.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "data.hpp"
#include "model.hpp"
#include "t5.hpp"

namespace t5ex {

struct pretrain_options {
  std::size_t steps = 600;
  std::size_t batch = 32;
  double lr = 5e-4;  // 5e-3 and above sit on the unigram plateau for thousands of steps
  double mask_rate = 0.15;
  std::uint64_t seed = 1;
};

/// Denoising pre-training of the encoder: 15% of the tokens (not </s>) are replaced by a mask
/// id (the last row of the embedding) and predicted through the tied embedding,
/// logits = (y / sqrt(d))·Eᵀ, with cross-entropy over the masked positions.
inline void pretrain(t5_encoder& enc, const dataset& data, const pretrain_options& o) {
  const std::size_t d = enc.config().d_model, V = enc.config().vocab_size;
  const auto mask_id = static_cast<std::int32_t>(V - 1);
  smear::parameter_list<float> params{{"encoder", enc.values(), enc.gradients(), true}};
  smear::adamw<float> opt{params, {.lr = o.lr, .weight_decay = 0.0}};
  smear::rng gen{o.seed};
  std::vector<std::size_t> order(data.train.size());
  std::iota(order.begin(), order.end(), 0);
  std::size_t cursor = order.size();
  std::vector<float> out, dout;
  double loss_avg = 0, acc_avg = 0;
  const auto start = std::chrono::steady_clock::now();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (std::size_t step = 1; step <= o.steps; ++step) {
    if (cursor + o.batch > order.size()) {
      for (std::size_t i = order.size(); i-- > 1;) std::swap(order[i], order[gen.below(i + 1)]);
      cursor = 0;
    }
    batch bt = make_batch(data.train, order, cursor, std::min(o.batch, order.size()));
    cursor += o.batch;
    const std::size_t B = bt.size, L = bt.length;
    std::vector<std::int32_t> target(B * L, -1);
    std::size_t masked = 0;
    for (std::size_t b = 0; b < B; ++b)
      for (std::size_t t = 0; t + 1 < static_cast<std::size_t>(bt.lengths[b]); ++t)
        if (gen.uniform() < o.mask_rate) {
          target[b * L + t] = bt.ids[b * L + t];
          bt.ids[b * L + t] = mask_id;
          ++masked;
        }
    if (masked == 0) continue;
    out.assign(B * L * d, 0.0f);
    dout.assign(B * L * d, 0.0f);
    enc.zero_grad();
    enc.forward(bt.ids, B, L, bt.lengths, out);
    const auto E = enc.tensor("shared.weight");
    auto dE = enc.gradient("shared.weight");
    // the masked rows, their logits (M×d)·(d×V) and the gradients, as GEMMs
    std::vector<std::size_t> rows;
    for (std::size_t i = 0; i < B * L; ++i)
      if (target[i] >= 0) rows.push_back(i);
    const std::size_t M = rows.size();
    std::vector<float> Y(M * d), Z(M * V), dY(M * d, 0.0f);
    for (std::size_t r = 0; r < M; ++r) std::copy_n(out.data() + rows[r] * d, d, Y.data() + r * d);
    using cref = smear::matrix_ref<const float>;
    using mref = smear::matrix_ref<float>;
    const smear::backend::cpu be{};
    smear::backend::gemm<float>(be, false, true, scale, cref{Y.data(), M, d}, cref{E.data(), V, d}, 0.0f,
                                mref{Z.data(), M, V});
    double loss = 0, right = 0;
    for (std::size_t r = 0; r < M; ++r) {
      float* z = Z.data() + r * V;
      const std::size_t best = static_cast<std::size_t>(std::max_element(z, z + V) - z);
      const float mx = z[best];
      double sum = 0;
      for (std::size_t v = 0; v < V; ++v) sum += std::exp(double(z[v] - mx));
      const auto tgt = static_cast<std::size_t>(target[rows[r]]);
      loss += std::log(sum) + mx - z[tgt];
      right += best == tgt ? 1 : 0;
      for (std::size_t v = 0; v < V; ++v)  // z ← ∂ℓ/∂z · scale
        z[v] = static_cast<float>((std::exp(double(z[v] - mx)) / sum - (v == tgt ? 1.0 : 0.0)) /
                                  static_cast<double>(masked)) * scale;
    }
    smear::backend::gemm<float>(be, false, false, 1.0f, cref{Z.data(), M, V}, cref{E.data(), V, d}, 0.0f,
                                mref{dY.data(), M, d});
    smear::backend::gemm<float>(be, true, false, 1.0f, cref{Z.data(), M, V}, cref{Y.data(), M, d}, 1.0f,
                                mref{dE.data(), V, d});
    for (std::size_t r = 0; r < M; ++r) std::copy_n(dY.data() + r * d, d, dout.data() + rows[r] * d);
    enc.backward(dout, true);
    opt.set_lr(o.lr * std::min(1.0, static_cast<double>(step) / 50.0));
    opt.step();
    loss /= static_cast<double>(masked);
    right /= static_cast<double>(masked);
    loss_avg = step == 1 ? loss : 0.95 * loss_avg + 0.05 * loss;
    acc_avg = step == 1 ? right : 0.95 * acc_avg + 0.05 * right;
    if (step % 25 == 0 || step == o.steps) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::fprintf(stderr, "[pretrain] step %zu/%zu  masked-token loss %.4f  accuracy %.3f  %.0f ex/s  ETA %s\n", step,
                   o.steps, loss_avg, acc_avg, static_cast<double>(step * o.batch) / el,
                   duration(el / static_cast<double>(step) * static_cast<double>(o.steps - step)).c_str());
    }
  }
}

}  // namespace t5ex
