#pragma once
/// \file model.hpp
/// The multi-task classifier of the T5-adapter example: a frozen T5 encoder with a routing
/// block of adapter experts after each attention and feed-forward sublayer, and one linear
/// classification head per task on the mean of the encoder's output; its training and
/// evaluation. The backbone's pre-training is in pretrain.hpp.

#include <smear/smear.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#ifdef SMEAR_T5_MPI
#include <smear/mpi.hpp>
#endif

#include "common/any_layer.hpp"
#include "common/heatmap.hpp"
#include "common/methods.hpp"
#include "data.hpp"
#include "t5.hpp"

namespace t5ex {

#ifdef SMEAR_T5_MPI
using data_parallel = smear::mpi::data_parallel<float>;
#else
/// Built without MPI there is one process, and training never meets a data_parallel object:
/// this stands in for smear::mpi::data_parallel's members that training calls.
struct data_parallel : smear::replica_group<float> {
  int rank() const { return 0; }
  int size() const { return 1; }
  void begin_batch(std::size_t) {}
  std::size_t first() const noexcept override { return 0; }
  std::size_t total() const noexcept override { return 0; }
  void sum(std::span<float>) override {}
  void ready(const smear::parameter_list<float>&) {}
  void finish() {}
  void broadcast(const smear::parameter_list<float>&) {}
};
#endif

/// What the routing blocks of one forward need besides their input.
struct route_context {
  std::span<const std::int32_t> tags{}, token_ids{};
  std::span<const float> example_losses{};
  data_parallel* replicas = nullptr;  ///< data-parallel training: each block's gradients are ready after its backward
};

/// A routing block (any smear::layer) in a sublayer hook, fed the batch's tags, token ids and
/// per-example losses as its strategy needs them.
class routing_hook final : public sublayer_hook {
 public:
  routing_hook(examples::any_layer<float> layer, const route_context* ctx, bool needs_tags, bool needs_tokens)
      : layer_(std::move(layer)), params_(layer_.parameters()), ctx_(ctx), tags_(needs_tags), tokens_(needs_tokens) {}
  void forward(smear::tokens<const float> x, std::span<float> y) override {
    smear::route_inputs in;
    if (tags_) in.tags = ctx_->tags;
    if (tokens_) in.token_ids = ctx_->token_ids;
    layer_.forward(x, y, in);
  }
  void backward(std::span<const float> dy, std::span<float> dx) override {
    layer_.backward(dy, dx, ctx_->example_losses);
    if (ctx_->replicas != nullptr) ctx_->replicas->ready(params_);  // final: into the buckets
  }
  examples::any_layer<float>& layer() { return layer_; }

 private:
  examples::any_layer<float> layer_;
  smear::parameter_list<float> params_;  ///< the layer's tensors (spans into its storage, which stays put)
  const route_context* ctx_;
  bool tags_, tokens_;
};

constexpr std::size_t experts_per_block = 8;

struct train_options {
  std::string method = "smear";
  std::size_t bottleneck = 8;      ///< adapter width m (d → m → d)
  std::size_t steps = 400;
  std::size_t batch = 32;
  std::size_t eval_every = 100;
  std::size_t eval_limit = 0;      ///< validation examples per evaluation (0: all)
  double lr = 3e-3;
  double weight_decay = 0.01;
  double expert_dropout = 0.1;     ///< SMEAR only, as in the official code
  std::uint64_t seed = 1;
  bool quiet = false;
  /// Data parallelism (mpirun): each process trains on its share of every batch, with
  /// gradients averaged over the processes; nullptr: one process.
  data_parallel* replicas = nullptr;
};

struct eval_result {
  std::vector<double> accuracy;  ///< per task
  double average = 0;            ///< mean over tasks
  double examples_per_s = 0;
  /// per block, [tasks × experts] mean routing distribution (when `routing` was asked)
  std::vector<std::vector<double>> routing;
};

/// The frozen encoder with routing blocks and per-task heads.
class classifier {
 public:
  classifier(t5_encoder& enc, const std::vector<task_info>& tasks, const train_options& o)
      : enc_(enc), tasks_(tasks), opt_(o) {
    const std::size_t d = enc.config().d_model, blocks = 2 * enc.config().num_layers;
    smear::layer_options lo;
    std::string m = o.method;
    std::size_t width = o.bottleneck;
    bool tags = false, tokens = false;
    std::size_t n = experts_per_block;
    if (examples::one_expert(m)) {
      n = 1;
      if (m == "dense") width = o.bottleneck * experts_per_block;  // parameter-matched: one adapter N times wider
    } else {
      lo.routing = smear::parse_strategy(m);
      lo.routing.tasks = tasks.size();
      tags = m == "tag" || m == "latent_skills";
      tokens = m == "hash";
      if (m == "smear") lo.router.expert_dropout = o.expert_dropout;
      if (m == "tag" && tasks.size() > n)
        throw smear::value_error(smear::detail::message("smear-t5: tag routing needs at most ", n, " tasks, got ",
                                                        tasks.size()));
    }
    for (std::size_t i = 0; i < blocks; ++i) {
      const std::uint64_t seed = o.seed * 1000 + i;
      auto layer = examples::make_layer<1, experts_per_block>(n, smear::adapter<float>{d, width}, lo, seed);
      layer.set_replicas(o.replicas);
      blocks_.push_back(std::make_unique<routing_hook>(std::move(layer), &ctx_, tags, tokens));
      enc_.set_hook(i, blocks_.back().get());
    }
    // heads: W_t [C_t, d] ~ N(0, d^-1), b_t = 0
    smear::rng gen{o.seed * 7919 + 3};
    for (const auto& t : tasks) {
      if (t.classes > 16)
        throw smear::value_error(smear::detail::message("smear-t5: task '", t.name, "' has ", t.classes,
                                                        " classes; at most 16 are supported"));
      head_offset_.push_back(head_.size());
      for (std::size_t i = 0; i < t.classes * d; ++i)
        head_.push_back(static_cast<float>(gen.normal() / std::sqrt(static_cast<double>(d))));
      head_.resize(head_.size() + t.classes, 0.0f);
    }
    head_grad_.assign(head_.size(), 0.0f);
  }
  ~classifier() {
    for (std::size_t i = 0; i < blocks_.size(); ++i) enc_.set_hook(i, nullptr);
  }
  classifier(const classifier&) = delete;
  classifier& operator=(const classifier&) = delete;

  smear::parameter_list<float> parameters() {
    smear::parameter_list<float> out;
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      for (auto p : blocks_[i]->layer().parameters()) {
        p.name = "block" + std::to_string(i) + "." + p.name;
        out.push_back(p);
      }
    out.push_back(heads());
    return out;
  }
  smear::parameter<float> heads() { return {"heads", head_, head_grad_, true}; }
  std::size_t trainable_count() {
    std::size_t n = 0;
    for (const auto& p : parameters()) n += p.value.size();
    return n;
  }
  const std::vector<std::unique_ptr<routing_hook>>& blocks() const { return blocks_; }
  void train(bool on) {
    for (auto& b : blocks_) b->layer().train(on);
  }

  /// Forward (and, when `learn`, backward) of one batch. Returns the mean loss; writes each
  /// example's predicted class into `predicted`.
  double step(const batch& bt, bool learn, std::vector<std::int32_t>& predicted) {
    const std::size_t d = enc_.config().d_model, B = bt.size, L = bt.length;
    ctx_.tags = bt.tasks;
    ctx_.token_ids = bt.ids;
    ctx_.example_losses = {};
    out_.assign(B * L * d, 0.0f);
    enc_.forward(bt.ids, B, L, bt.lengths, out_);
    pooled_.assign(B * d, 0.0f);
    losses_.assign(B, 0.0f);
    predicted.assign(B, 0);
    dlogits_.assign(B * 16, 0.0f);
    double total = 0;
    for (std::size_t b = 0; b < B; ++b) {
      const auto n = static_cast<std::size_t>(bt.lengths[b]);
      for (std::size_t t = 0; t < n; ++t)
        for (std::size_t j = 0; j < d; ++j) pooled_[b * d + j] += out_[(b * L + t) * d + j] / static_cast<float>(n);
      const auto task = static_cast<std::size_t>(bt.tasks[b]);
      const std::size_t C = tasks_[task].classes;
      const float* W = head_.data() + head_offset_[task];
      const float* bias = W + C * d;
      double logits[16] = {}, mx = -1e30;
      for (std::size_t c = 0; c < C; ++c) {
        double z = bias[c];
        for (std::size_t j = 0; j < d; ++j) z += double(W[c * d + j]) * pooled_[b * d + j];
        logits[c] = z;
        mx = std::max(mx, z);
      }
      double sum = 0;
      for (std::size_t c = 0; c < C; ++c) sum += std::exp(logits[c] - mx);
      const auto y = static_cast<std::size_t>(bt.labels[b]);
      losses_[b] = static_cast<float>(std::log(sum) + mx - logits[y]);
      total += losses_[b];
      std::size_t best = 0;
      for (std::size_t c = 0; c < C; ++c) {
        if (logits[c] > logits[best]) best = c;
        dlogits_[b * 16 + c] = static_cast<float>((std::exp(logits[c] - mx) / sum - (c == y ? 1.0 : 0.0)) / double(B));
      }
      predicted[b] = static_cast<std::int32_t>(best);
    }
    if (learn) {
      dout_.assign(B * L * d, 0.0f);
      for (std::size_t b = 0; b < B; ++b) {
        const auto task = static_cast<std::size_t>(bt.tasks[b]);
        const std::size_t C = tasks_[task].classes;
        const auto n = static_cast<std::size_t>(bt.lengths[b]);
        const float* W = head_.data() + head_offset_[task];
        float* gW = head_grad_.data() + head_offset_[task];
        std::vector<float> dp(d, 0.0f);
        for (std::size_t c = 0; c < C; ++c) {
          const float g = dlogits_[b * 16 + c];
          gW[C * d + c] += g;
          for (std::size_t j = 0; j < d; ++j) {
            gW[c * d + j] += g * pooled_[b * d + j];
            dp[j] += g * W[c * d + j];
          }
        }
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t j = 0; j < d; ++j) dout_[(b * L + t) * d + j] = dp[j] / static_cast<float>(n);
      }
      ctx_.example_losses = losses_;
      ctx_.replicas = opt_.replicas;
      if (ctx_.replicas != nullptr) ctx_.replicas->ready({heads()});  // the heads' gradients are final
      enc_.backward(dout_, false);  // each block's are after its backward (routing_hook)
      ctx_.replicas = nullptr;
    }
    return total / static_cast<double>(B);
  }

  /// Accuracy per task on `data` (at most `limit` examples, 0: all), in evaluation mode.
  eval_result evaluate(const std::vector<example>& data, std::size_t limit, bool routing) {
    train(false);
    eval_result r;
    const std::size_t T = tasks_.size(), n = limit == 0 ? data.size() : std::min(limit, data.size());
    std::vector<double> right(T, 0), count(T, 0);
    examples::routing_means means{T};
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::vector<std::int32_t> pred;
    const auto start = std::chrono::steady_clock::now();
    for (std::size_t first = 0; first < n; first += opt_.batch) {
      const std::size_t c = std::min(opt_.batch, n - first);
      const batch bt = make_batch(data, order, first, c);
      step(bt, false, pred);
      for (std::size_t i = 0; i < c; ++i) {
        const auto t = static_cast<std::size_t>(bt.tasks[i]);
        count[t] += 1;
        right[t] += pred[i] == bt.labels[i] ? 1 : 0;
      }
      if (routing)
        means.add(std::span<const std::int32_t>(bt.tasks), blocks_.size(),
                  [&](std::size_t k) { return blocks_[k]->layer().routing(); });
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.examples_per_s = static_cast<double>(n) / std::max(secs, 1e-9);
    for (std::size_t t = 0; t < T; ++t) {
      r.accuracy.push_back(count[t] > 0 ? right[t] / count[t] : 0.0);
      r.average += r.accuracy.back() / static_cast<double>(T);
    }
    if (routing) r.routing = means.means();
    train(true);
    return r;
  }

 private:
  t5_encoder& enc_;
  const std::vector<task_info>& tasks_;
  train_options opt_;
  route_context ctx_;
  std::vector<std::unique_ptr<routing_hook>> blocks_;
  std::vector<float> head_, head_grad_;
  std::vector<std::size_t> head_offset_;
  std::vector<float> out_, pooled_, losses_, dlogits_, dout_;
};

/// Formats seconds as "1m23s".
inline std::string duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return buf;
}

struct train_result {
  eval_result test;
  double best_validation = 0;
  std::size_t best_step = 0;
  double train_seconds = 0;
  std::size_t trainable = 0;
};

/// Trains the adapters, routers and heads with AdamW on mixed-task batches, evaluates on the
/// validation split every `eval_every` steps, keeps the best parameters, and reports the test
/// accuracy of those. With o.replicas, each of the R processes runs examples
/// [B·r/R, B·(r+1)/R) of every batch and the gradients are averaged: the same training as one
/// process on the whole batches (up to the order of float sums); process 0 reports and writes.
inline train_result train_classifier(t5_encoder& enc, const dataset& data, const train_options& o,
                                     const std::string& checkpoint = {}) {
  classifier model{enc, data.tasks, o};
  auto params = model.parameters();
  const std::size_t rank = o.replicas ? static_cast<std::size_t>(o.replicas->rank()) : 0,
                    ranks = o.replicas ? static_cast<std::size_t>(o.replicas->size()) : 1;
  const bool quiet = o.quiet || rank != 0;
  if (o.replicas != nullptr) o.replicas->broadcast(params);  // every process starts from process 0's
  smear::adamw<float> opt{params, {.lr = o.lr, .weight_decay = o.weight_decay}};
  train_result res;
  res.trainable = model.trainable_count();
  std::vector<std::vector<float>> best;
  auto snapshot = [&] {
    best.clear();
    for (const auto& p : params) best.emplace_back(p.value.begin(), p.value.end());
  };
  smear::rng gen{o.seed};
  std::vector<std::size_t> order(data.train.size());
  std::iota(order.begin(), order.end(), 0);
  std::size_t cursor = order.size();
  std::vector<std::int32_t> pred;
  double loss_avg = 0;
  const auto start = std::chrono::steady_clock::now();
  double eval_seconds = 0;
  for (std::size_t step = 1; step <= o.steps; ++step) {
    if (cursor + o.batch > order.size()) {  // new epoch: reshuffle (Fisher–Yates, seeded)
      for (std::size_t i = order.size(); i-- > 1;) std::swap(order[i], order[gen.below(i + 1)]);
      cursor = 0;
    }
    const std::size_t B = std::min(o.batch, order.size()), lo = B * rank / ranks, hi = B * (rank + 1) / ranks;
    const batch bt = make_batch(data.train, order, cursor + lo, hi - lo);  // this process's share
    cursor += o.batch;
    opt.zero_grad();
    if (o.replicas != nullptr) o.replicas->begin_batch(hi - lo);
    double loss = model.step(bt, true, pred);
    if (o.replicas != nullptr) {
      o.replicas->finish();  // the gradients of the whole batch's mean loss, on every process
      float share = static_cast<float>(loss * static_cast<double>(hi - lo) / static_cast<double>(B));
      o.replicas->sum(std::span<float>(&share, 1));
      loss = share;
    }
    opt.set_lr(o.lr * std::min(1.0, static_cast<double>(step) / 20.0));  // short warm-up
    opt.step();
    loss_avg = step == 1 ? loss : 0.95 * loss_avg + 0.05 * loss;
    const std::size_t report = std::max<std::size_t>(1, o.eval_every / 4);
    if (!quiet && step % report == 0 && step % o.eval_every != 0 && step != o.steps) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() - eval_seconds;
      std::fprintf(stderr, "[%s] step %zu/%zu  loss %.4f  %.0f ex/s  ETA %s\n", o.method.c_str(), step, o.steps,
                   loss_avg, static_cast<double>(step * o.batch) / elapsed,
                   duration(elapsed / static_cast<double>(step) * static_cast<double>(o.steps - step)).c_str());
    }
    if (step % o.eval_every == 0 || step == o.steps) {
      const auto e0 = std::chrono::steady_clock::now();
      const eval_result v = model.evaluate(data.validation, o.eval_limit, false);
      eval_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count();
      const bool better = best.empty() || v.average > res.best_validation;
      if (better) {
        res.best_validation = v.average;
        res.best_step = step;
        snapshot();
      }
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() - eval_seconds;
      if (!quiet)
        std::fprintf(stderr, "[%s] step %zu/%zu  loss %.4f  %.0f ex/s  validation %.4f%s  ETA %s\n", o.method.c_str(),
                     step, o.steps, loss_avg, static_cast<double>(step * o.batch) / elapsed, v.average,
                     better ? " (best)" : "",
                     duration(elapsed / static_cast<double>(step) * static_cast<double>(o.steps - step)).c_str());
    }
  }
  res.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() - eval_seconds;
  for (std::size_t i = 0; i < params.size(); ++i) std::copy(best[i].begin(), best[i].end(), params[i].value.begin());
  if (!checkpoint.empty() && rank == 0) {
    smear::safetensors_writer out;
    for (std::size_t i = 0; i < params.size(); ++i)
      out.add(params[i].name, std::span<const float>(best[i]), {best[i].size()});
    out.metadata("method", o.method);
    out.metadata("best_step", std::to_string(res.best_step));
    out.save(checkpoint);
  }
  res.test = model.evaluate(data.test, 0, true);
  return res;
}

}  // namespace t5ex
