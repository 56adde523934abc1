#pragma once
/// \file train.hpp
/// Training in the ResNet-adapter example: the backbone's pre-training and its safetensors
/// file, then adaptation with one routing strategy: routing blocks in the frozen backbone and a
/// new head are trained on the emoji, and tested (accuracy and mean routing per domain, speed).

#include <smear/io/safetensors.hpp>
#include <smear/smear.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "common/heatmap.hpp"
#include "common/methods.hpp"
#include "dataset.hpp"
#include "resnet.hpp"

namespace resnet {

using clock_type = std::chrono::steady_clock;

inline double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

/// "2,2,2,2".
inline std::string join(const std::vector<std::size_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

/// The class of the largest logit in row i of `logits` ([n, classes]).
inline std::int32_t predicted(const std::vector<float>& logits, std::size_t i, std::size_t classes) {
  const auto first = logits.begin() + static_cast<std::ptrdiff_t>(i * classes);
  return static_cast<std::int32_t>(std::max_element(first, first + static_cast<std::ptrdiff_t>(classes)) - first);
}

// ---------------------------------------------------------------------------------------------
// the backbone: its file and its pre-training

using backbone_net = network<float>;

namespace detail {
inline std::string norm_prefix(const std::string& gamma_name) { return gamma_name.substr(0, gamma_name.size() - 7); }
}  // namespace detail

/// The backbone's tensors and batch-norm statistics, with its architecture as metadata.
inline void save_backbone(backbone_net& net, const std::filesystem::path& path, const std::string& note) {
  smear::safetensors_writer out;
  for (auto* t : net.backbone_tensors()) out.add(t->name, std::span<const float>(t->value), t->shape);
  for (auto* bn : net.norms()) {
    const std::string p = detail::norm_prefix(bn->gamma.name);
    out.add(p + ".running_mean", std::span<const float>(bn->running_mean), {bn->channels()});
    out.add(p + ".running_var", std::span<const float>(bn->running_var), {bn->channels()});
  }
  const auto& a = net.arch();
  out.metadata("image", std::to_string(a.image));
  out.metadata("width", std::to_string(a.width));
  out.metadata("blocks", join(a.blocks));
  out.metadata("stem_stride", std::to_string(a.stem_stride));
  out.metadata("pretrained_on", note);
  out.save(path);
}

inline architecture backbone_architecture(const smear::safetensors_file& f) {
  auto get = [&](const char* k) {
    auto it = f.metadata().find(k);
    if (it == f.metadata().end())
      throw smear::io_error(f.name() + ": not a smear-resnet backbone (no '" + k + "' metadata)");
    return it->second;
  };
  architecture a;
  a.image = std::stoul(get("image"));
  a.width = std::stoul(get("width"));
  std::stringstream in(get("blocks"));
  a.blocks.clear();
  for (std::string s; std::getline(in, s, ',');)
    if (!s.empty()) a.blocks.push_back(std::stoul(s));
  if (a.blocks.empty()) throw smear::io_error(f.name() + ": no stage in the 'blocks' metadata");
  a.stem_stride = std::stoul(get("stem_stride"));
  return a;
}

inline void load_backbone(backbone_net& net, const smear::safetensors_file& f) {
  for (auto* t : net.backbone_tensors()) f.read(t->name, std::span<float>(t->value));
  for (auto* bn : net.norms()) {
    const std::string p = detail::norm_prefix(bn->gamma.name);
    f.read(p + ".running_mean", std::span<float>(bn->running_mean));
    f.read(p + ".running_var", std::span<float>(bn->running_var));
  }
}

struct pretrain_config {
  architecture arch;
  std::size_t epochs = 1, limit = 0, batch = 64;
  double lr = 1e-3;
  std::uint64_t seed = 0;
  int invert = -1;  // -1: invert one-channel data
  bool quiet = false;
};

/// Trains the whole network (backbone and head) on `data_file`'s training split, reports the
/// test accuracy, and saves the backbone to `out`.
inline void pretrain(const std::filesystem::path& data_file, const std::filesystem::path& out, pretrain_config cfg) {
  imageset::dataset d = imageset::read(data_file);
  if (d.height != d.width) throw smear::value_error("pretrain: images must be square");
  cfg.arch.image = d.height;
  std::int32_t max_label = 0;
  for (auto l : d.labels) max_label = std::max(max_label, l);
  const auto classes = static_cast<std::size_t>(max_label + 1);
  const bool invert = cfg.invert < 0 ? d.channels == 1 : cfg.invert == 1;
  backbone_net net{cfg.arch, classes, cfg.seed};
  auto params = net.parameters(true);
  smear::adamw<float> opt{params, {.lr = cfg.lr, .weight_decay = 1e-4}};
  auto train = d.indices(0);
  smear::rng gen{cfg.seed + 17};
  std::vector<float> x, dlogits;
  std::vector<std::int32_t> y;
  const std::size_t per_epoch = cfg.limit > 0 ? std::min(cfg.limit, train.size()) : train.size();
  const std::size_t steps = cfg.epochs * ((per_epoch + cfg.batch - 1) / cfg.batch);
  std::cout << "pretrain: " << data_file.filename().string() << ", " << per_epoch << " of " << train.size()
            << " training images x " << cfg.epochs << " epochs, " << classes << " classes, ResNet width "
            << cfg.arch.width << " blocks " << join(cfg.arch.blocks) << ", " << steps << " steps\n";
  const auto t0 = clock_type::now();
  std::size_t step = 0;
  double run_loss = 0, run_acc = 0;
  std::size_t run_n = 0;
  for (std::size_t ep = 0; ep < cfg.epochs; ++ep) {
    for (std::size_t i = train.size(); i > 1; --i) std::swap(train[i - 1], train[gen.below(i)]);
    for (std::size_t b0 = 0; b0 < per_epoch; b0 += cfg.batch) {
      const std::size_t n = std::min(cfg.batch, per_epoch - b0);
      const std::span<const std::size_t> idx(train.data() + b0, n);
      imageset::batch(d, idx, x, invert);
      y.resize(n);
      for (std::size_t i = 0; i < n; ++i) y[i] = d.labels[idx[i]];
      const auto& logits = net.forward(x, n, true);
      run_loss += cross_entropy(logits, std::span<const std::int32_t>(y), classes, dlogits) * static_cast<double>(n);
      for (std::size_t i = 0; i < n; ++i) run_acc += predicted(logits, i, classes) == y[i];
      run_n += n;
      net.zero_grad();
      net.backward(dlogits);
      opt.step();
      ++step;
      if (!cfg.quiet && (step % std::max<std::size_t>(1, steps / 20) == 0 || step == steps)) {
        const double t = seconds_since(t0);
        std::cout << "  step " << step << "/" << steps << "  loss " << std::fixed << std::setprecision(3)
                  << run_loss / static_cast<double>(run_n) << "  train acc " << std::setprecision(3)
                  << run_acc / static_cast<double>(run_n) << "  " << std::setprecision(1)
                  << static_cast<double>(step * cfg.batch) / t << " img/s  eta "
                  << t / static_cast<double>(step) * static_cast<double>(steps - step) << " s" << std::endl;
        std::cout.unsetf(std::ios::floatfield);
        std::cout << std::setprecision(6);
        run_loss = run_acc = 0;
        run_n = 0;
      }
    }
  }
  // test accuracy (batch norm in inference mode)
  const auto test = d.indices(1);
  std::size_t right = 0, seen = 0;
  const std::size_t test_n = std::min<std::size_t>(test.size(), 5000);
  for (std::size_t b0 = 0; b0 < test_n; b0 += 256) {
    const std::size_t n = std::min<std::size_t>(256, test_n - b0);
    const std::span<const std::size_t> idx(test.data() + b0, n);
    imageset::batch(d, idx, x, invert);
    const auto& logits = net.forward(x, n, false);
    for (std::size_t i = 0; i < n; ++i) right += predicted(logits, i, classes) == d.labels[idx[i]];
    seen += n;
  }
  std::cout << "pretrain: " << std::fixed << std::setprecision(1) << seconds_since(t0) << " s, test accuracy "
            << std::setprecision(4) << static_cast<double>(right) / static_cast<double>(std::max<std::size_t>(seen, 1))
            << " on " << seen << " images; saved " << out.string() << std::endl;
  std::cout.unsetf(std::ios::floatfield);
  save_backbone(net, out, data_file.filename().string());
}

// ---------------------------------------------------------------------------------------------
// adaptation with one routing strategy

/// Throws value_error unless `name` is one of examples::all_methods().
inline void check_strategy(const std::string& name) {
  if (!examples::known_method(name))
    throw smear::value_error("smear-resnet: unknown strategy '" + name + "'; known: " + examples::method_list());
}

struct run_config {
  std::string strategy = "smear";
  bool conv = false;
  std::size_t experts = 6, reduction = 4, epochs = 8, batch = 32;
  double lr = 1e-3;
  std::uint64_t seed = 0;
  bool quiet = false;
};

struct run_result {
  std::string strategy, expert;
  std::size_t experts = 0;
  std::uint64_t seed = 0;
  std::vector<double> domain_accuracy;
  double average = 0, train_seconds = 0, images_per_second = 0;
  std::size_t trainable = 0;
  /// Per routing block: [domains × experts] (row-major) mean routing probability on the test images.
  std::vector<std::vector<double>> routing;
};

/// The routing blocks of cfg's strategy. `single` and `dense` are one expert (N = 1), `dense`
/// one as wide as N of them. Throws value_error for an unknown strategy or an N not compiled.
inline adapter_config routing_config(const run_config& cfg, std::size_t domains) {
  check_strategy(cfg.strategy);
  const bool one = examples::one_expert(cfg.strategy);
  if (!one && cfg.experts != 6 && cfg.experts != 12)
    throw smear::value_error("smear-resnet: --experts must be 6 or 12 (the instantiated sizes), got " +
                             std::to_string(cfg.experts));
  adapter_config ac;
  ac.conv = cfg.conv;
  ac.experts = one ? 1 : cfg.experts;
  ac.reduction = cfg.reduction;
  if (cfg.strategy == "dense") ac.widen = cfg.experts;
  if (!one) ac.layer.routing = smear::parse_strategy(cfg.strategy);
  ac.layer.routing.hash_seed = cfg.seed;
  if (ac.layer.routing.strategy == smear::strategy::latent_skills) ac.layer.routing.tasks = domains;
  return ac;
}

namespace detail {

/// What the strategies read for a batch: the domain as tag (tag routing, latent skills) and a
/// stable id per image (hash routing).
class route_feed {
 public:
  explicit route_feed(const imageset::dataset& d) : d_(d) {}
  smear::route_inputs operator()(std::span<const std::size_t> idx) {
    tags_.resize(idx.size());
    ids_.resize(idx.size());
    for (std::size_t i = 0; i < idx.size(); ++i) {
      tags_[i] = d_.domains[idx[i]];
      ids_[i] = idx[i];
    }
    return smear::route_inputs{.tags = tags_, .token_ids = {}, .example_ids = ids_};
  }

 private:
  const imageset::dataset& d_;
  std::vector<std::int32_t> tags_;
  std::vector<std::uint64_t> ids_;
};

/// The backbone with a new head and the routing blocks `ac`, standardised on (up to 2048)
/// training images.
inline void build(backbone_net& net, const imageset::dataset& d, const smear::safetensors_file& backbone,
                  const adapter_config& ac, std::uint64_t seed, const std::vector<std::size_t>& train) {
  load_backbone(net, backbone);
  net.reset_head(d.classes(), seed + 101);
  net.add_routing(ac, seed + 202);
  std::size_t at = 0;
  const std::size_t limit = std::min<std::size_t>(train.size(), 2048);
  std::vector<float> x;
  net.calibrate_routing([&](std::vector<float>& images, std::size_t& n) {
    if (at >= limit) return false;
    n = std::min<std::size_t>(256, limit - at);
    imageset::batch(d, std::span<const std::size_t>(train.data() + at, n), x);
    images = x;
    at += n;
    return true;
  });
}

/// Accuracy and mean routing per domain on the test split, and inference speed, into `r`.
inline void evaluate(backbone_net& net, const imageset::dataset& d, run_result& r) {
  const auto test = d.indices(1);
  const std::size_t classes = d.classes(), domains = d.domain_names.size();
  for (auto& b : net.blocks) b->route->layer().train(false);
  route_feed inputs{d};
  examples::routing_means means{domains};
  std::vector<std::size_t> hit(domains, 0), total(domains, 0);
  std::vector<float> x;
  double infer_seconds = 0;
  for (std::size_t b0 = 0; b0 < test.size(); b0 += 128) {
    const std::size_t n = std::min<std::size_t>(128, test.size() - b0);
    const std::span<const std::size_t> idx(test.data() + b0, n);
    imageset::batch(d, idx, x);
    const auto in = inputs(idx);
    const auto ti = clock_type::now();
    const auto& logits = net.forward(x, n, false, in);
    infer_seconds += seconds_since(ti);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t dom = d.domains[idx[i]];
      hit[dom] += predicted(logits, i, classes) == d.labels[idx[i]];
      ++total[dom];
    }
    means.add(in.tags, net.blocks.size(), [&](std::size_t k) { return net.blocks[k]->route->layer().routing(); });
  }
  r.routing = means.means();
  double sum = 0;
  for (std::size_t dom = 0; dom < domains; ++dom) {
    r.domain_accuracy.push_back(static_cast<double>(hit[dom]) / static_cast<double>(std::max<std::size_t>(total[dom], 1)));
    sum += r.domain_accuracy.back();
  }
  r.average = sum / static_cast<double>(std::max<std::size_t>(domains, 1));
  r.images_per_second = static_cast<double>(test.size()) / std::max(infer_seconds, 1e-9);
}

}  // namespace detail

/// Adapts the frozen backbone to `d` with cfg's strategy: trains the routing blocks and a new
/// head with AdamW for cfg.epochs epochs, then tests. Throws value_error as routing_config().
inline run_result adapt(const imageset::dataset& d, const smear::safetensors_file& backbone, const run_config& cfg) {
  const adapter_config ac = routing_config(cfg, d.domain_names.size());
  const std::size_t N = ac.experts, classes = d.classes();
  backbone_net net{backbone_architecture(backbone), classes, cfg.seed};
  auto train = d.indices(0);
  detail::build(net, d, backbone, ac, cfg.seed, train);
  auto params = net.parameters(false);
  std::size_t trainable = 0;
  for (const auto& p : params) trainable += p.value.size();
  smear::adamw<float> opt{params, {.lr = cfg.lr, .weight_decay = 0.0}};
  smear::rng gen{cfg.seed + 303};
  for (auto& b : net.blocks) b->route->layer().train(true);

  detail::route_feed inputs{d};
  std::vector<float> x, dlogits, losses;
  std::vector<std::int32_t> y;
  const auto t0 = clock_type::now();
  for (std::size_t ep = 0; ep < cfg.epochs; ++ep) {
    for (std::size_t i = train.size(); i > 1; --i) std::swap(train[i - 1], train[gen.below(i)]);
    double loss_sum = 0;
    std::size_t right = 0;
    for (std::size_t b0 = 0; b0 < train.size(); b0 += cfg.batch) {
      const std::size_t n = std::min(cfg.batch, train.size() - b0);
      const std::span<const std::size_t> idx(train.data() + b0, n);
      imageset::batch(d, idx, x);
      y.resize(n);
      for (std::size_t i = 0; i < n; ++i) y[i] = d.labels[idx[i]];
      const auto& logits = net.forward(x, n, false, inputs(idx));
      loss_sum += cross_entropy(logits, std::span<const std::int32_t>(y), classes, dlogits, &losses) *
                  static_cast<double>(n);
      for (std::size_t i = 0; i < n; ++i) right += predicted(logits, i, classes) == y[i];
      net.zero_grad();
      net.backward(dlogits, losses);
      opt.step();
    }
    if (!cfg.quiet)
      std::cout << "  [" << cfg.strategy << " " << (cfg.conv ? "conv" : "adapter") << " N=" << N << " seed "
                << cfg.seed << "] epoch " << ep + 1 << "/" << cfg.epochs << "  loss " << std::setprecision(4)
                << loss_sum / static_cast<double>(train.size()) << "  train acc "
                << static_cast<double>(right) / static_cast<double>(train.size()) << "  "
                << std::setprecision(3) << seconds_since(t0) << " s" << std::endl << std::setprecision(6);
  }
  run_result r;
  r.train_seconds = seconds_since(t0);
  r.strategy = cfg.strategy;
  r.expert = cfg.conv ? "conv3x3" : "adapter";
  r.experts = N;
  r.seed = cfg.seed;
  r.trainable = trainable;
  detail::evaluate(net, d, r);
  return r;
}

}  // namespace resnet
