// smear-resnet: the paper's ResNet/DomainNet experiment in miniature. A small ResNet is
// pre-trained (MNIST by default), frozen, and routing blocks of adapter experts inside its
// residual blocks are trained with each routing strategy on emoji drawn in several styles
// (domains); accuracy per domain, speed and a domains × experts heatmap per routing block.
//
//   smear-resnet pretrain --data DIR --out backbone.safetensors
//   smear-resnet train    --data DIR --backbone FILE --strategy smear [--expert conv] [--experts 12]
//   smear-resnet compare  --data DIR --backbone FILE [--strategies smear,single,...] [--seeds 0,1]
//   smear-resnet quick    --data DIR            (pre-trains a small backbone, then compares)
//   smear-resnet make-tiny DIR                   (a synthetic data set for tests)
//
// Run `smear-resnet help` for every option.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <smear/io/safetensors.hpp>
#include <smear/smear.hpp>

#include "dataset.hpp"
#include "resnet.hpp"

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

const char* usage = R"(smear-resnet: SMEAR routing blocks in a frozen ResNet, on emoji in several drawing styles

commands:
  pretrain  --data DIR [--out FILE] [--pretrain-data FILE]   train the backbone, save it (safetensors)
  train     --data DIR --backbone FILE [--strategy S]        one strategy, accuracy per domain
  compare   --data DIR --backbone FILE [--strategies LIST]   every strategy: Markdown + CSV table, heatmaps
  quick     --data DIR [--out DIR]                           small pretrain + compare, a few minutes
  make-tiny DIR                                              write a synthetic data set (tests)

data: DIR holds emoji.bin, classes.txt, domains.txt (and mnist.bin) from prepare_data
      (default DIR: $SMEAR_DATA/resnet/emoji-32, SMEAR_DATA defaulting to ~/.cache/smear).

backbone options (pretrain):
  --width W (16)  --blocks 2,2,2,2  --stem-stride S (2)  --epochs E (1)  --limit N (all)
  --batch B (64)  --lr LR (1e-3)  --pretrain-data FILE (DIR/mnist.bin)  --invert 0|1 (1 for 1-channel data)
adaptation options (train, compare, quick):
  --strategy S / --strategies A,B,..  smear tag hash st_gumbel reinforce dselect ensemble single dense
                 adamix latent_skills (default: all); tag and latent skills use the domain as tag
  --expert adapter|conv (adapter)  --experts 6|12 (6)  --reduction R (4: bottleneck = channels / R)
  --epochs E (8)  --batch B (32)  --lr LR (1e-3)  --seeds 0,1,.. (0)  --threads T (1)
  --csv FILE  --markdown FILE   tables (compare; default: compare.csv, compare.md in --out DIR)
  --out DIR (results; quick: results-quick)   also receives the heatmaps (SVG, PNG with rsvg-convert)
  --quiet   quick also takes --pretrain-epochs --pretrain-limit --pretrain-batch --pretrain-lr
)";

/// --key value options.
class options {
 public:
  options(int argc, char** argv, int first) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) {
        positional_.push_back(a);
        continue;
      }
      a = a.substr(2);
      if (a == "quiet") {
        values_[a] = "1";
        continue;
      }
      if (i + 1 >= argc) throw smear::value_error("smear-resnet: option --" + a + " needs a value");
      values_[a] = argv[++i];
    }
  }
  bool has(const std::string& k) const { return values_.contains(k); }
  std::string get(const std::string& k, const std::string& fallback) const {
    used_.push_back(k);
    auto it = values_.find(k);
    return it == values_.end() ? fallback : it->second;
  }
  double number(const std::string& k, double fallback) const {
    const std::string v = get(k, "");
    if (v.empty()) return fallback;
    try {
      std::size_t pos = 0;
      const double d = std::stod(v, &pos);
      if (pos != v.size()) throw std::invalid_argument(v);
      return d;
    } catch (const std::exception&) {
      throw smear::value_error("smear-resnet: --" + k + " expects a number, got '" + v + "'");
    }
  }
  std::size_t count(const std::string& k, std::size_t fallback) const {
    const double d = number(k, static_cast<double>(fallback));
    if (d < 0 || d != std::floor(d))
      throw smear::value_error("smear-resnet: --" + k + " expects a non-negative integer");
    return static_cast<std::size_t>(d);
  }
  std::vector<std::string> list(const std::string& k, const std::string& fallback) const {
    std::vector<std::string> out;
    std::stringstream in(get(k, fallback));
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  }
  const std::vector<std::string>& positional() const { return positional_; }
  /// Throws value_error naming the first option no command read.
  void check_all_used() const {
    for (const auto& [k, v] : values_)
      if (std::find(used_.begin(), used_.end(), k) == used_.end())
        throw smear::value_error("smear-resnet: unknown option --" + k + " for this command (see `smear-resnet help`)");
  }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
  mutable std::vector<std::string> used_;
};

fs::path default_data() {
  const char* env = std::getenv("SMEAR_DATA");
  const char* home = std::getenv("HOME");
  const fs::path root = env ? fs::path(env) : fs::path(home ? home : ".") / ".cache" / "smear";
  return root / "resnet" / "emoji-32";
}

imageset::dataset load_emoji(const fs::path& dir) {
  const fs::path file = dir / "emoji.bin";
  if (!fs::exists(file))
    throw smear::io_error("smear-resnet: " + file.string() +
                          " not found; run examples/resnet_adapter/prepare_data first (or pass --data DIR)");
  return imageset::read(file);
}

std::vector<std::size_t> parse_blocks(const std::vector<std::string>& v) {
  std::vector<std::size_t> out;
  for (const auto& s : v) out.push_back(static_cast<std::size_t>(std::stoul(s)));
  if (out.empty()) throw smear::value_error("smear-resnet: --blocks needs at least one stage");
  return out;
}

// ---------------------------------------------------------------------------------------------
// backbone files

using backbone_net = resnet::network<float, smear::adapter<float>, 1>;

std::string join(const std::vector<std::size_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

std::string norm_prefix(const std::string& gamma_name) { return gamma_name.substr(0, gamma_name.size() - 7); }

template <class Net>
void save_backbone(Net& net, const fs::path& path, const std::string& note) {
  smear::safetensors_writer out;
  for (auto* t : net.backbone_tensors()) out.add(t->name, std::span<const float>(t->value), t->shape);
  for (auto* bn : net.norms()) {
    const std::string p = norm_prefix(bn->gamma.name);
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

resnet::architecture backbone_architecture(const smear::safetensors_file& f) {
  auto get = [&](const char* k) {
    auto it = f.metadata().find(k);
    if (it == f.metadata().end())
      throw smear::io_error(f.name() + ": not a smear-resnet backbone (no '" + k + "' metadata)");
    return it->second;
  };
  resnet::architecture a;
  a.image = std::stoul(get("image"));
  a.width = std::stoul(get("width"));
  std::vector<std::string> parts;
  std::stringstream in(get("blocks"));
  for (std::string s; std::getline(in, s, ',');) parts.push_back(s);
  a.blocks = parse_blocks(parts);
  a.stem_stride = std::stoul(get("stem_stride"));
  return a;
}

template <class Net>
void load_backbone(Net& net, const smear::safetensors_file& f) {
  for (auto* t : net.backbone_tensors()) f.read(t->name, std::span<float>(t->value));
  for (auto* bn : net.norms()) {
    const std::string p = norm_prefix(bn->gamma.name);
    f.read(p + ".running_mean", std::span<float>(bn->running_mean));
    f.read(p + ".running_var", std::span<float>(bn->running_var));
  }
}

// ---------------------------------------------------------------------------------------------
// pre-training

struct pretrain_config {
  resnet::architecture arch;
  std::size_t epochs = 1, limit = 0, batch = 64;
  double lr = 1e-3;
  std::uint64_t seed = 0;
  int invert = -1;  // -1: invert one-channel data
  bool quiet = false;
};

void pretrain(const fs::path& data_file, const fs::path& out, pretrain_config cfg) {
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
      run_loss += resnet::cross_entropy(logits, std::span<const std::int32_t>(y), classes, dlogits) * static_cast<double>(n);
      for (std::size_t i = 0; i < n; ++i)
        run_acc += std::max_element(logits.begin() + static_cast<std::ptrdiff_t>(i * classes),
                                    logits.begin() + static_cast<std::ptrdiff_t>((i + 1) * classes)) -
                               (logits.begin() + static_cast<std::ptrdiff_t>(i * classes)) == y[i];
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
  std::size_t correct = 0, seen = 0;
  const std::size_t test_n = std::min<std::size_t>(test.size(), 5000);
  for (std::size_t b0 = 0; b0 < test_n; b0 += 256) {
    const std::size_t n = std::min<std::size_t>(256, test_n - b0);
    const std::span<const std::size_t> idx(test.data() + b0, n);
    imageset::batch(d, idx, x, invert);
    const auto& logits = net.forward(x, n, false);
    for (std::size_t i = 0; i < n; ++i) {
      const auto first = logits.begin() + static_cast<std::ptrdiff_t>(i * classes);
      correct += (std::max_element(first, first + static_cast<std::ptrdiff_t>(classes)) - first) == d.labels[idx[i]];
    }
    seen += n;
  }
  std::cout << "pretrain: " << std::fixed << std::setprecision(1) << seconds_since(t0) << " s, test accuracy "
            << std::setprecision(4) << static_cast<double>(correct) / static_cast<double>(std::max<std::size_t>(seen, 1))
            << " on " << seen << " images; saved " << out.string() << std::endl;
  std::cout.unsetf(std::ios::floatfield);
  save_backbone(net, out, data_file.filename().string());
}

// ---------------------------------------------------------------------------------------------
// adaptation with one routing strategy

struct run_config {
  std::string strategy = "smear";
  smear::strategy_options routing{};  ///< from the strategy's name (single and dense: smear, N = 1)
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
  /// Per routing block: [domains, experts] mean routing probability on the test images.
  std::vector<std::vector<std::vector<double>>> heat;
};

/// Strategies this build runs; the others need the layer's routing strategies.
/// Every strategy by its command-line name, in the order of the comparison table.
const std::vector<std::string> all_strategies{"smear",     "tag",    "hash",   "st_gumbel", "reinforce", "dselect",
                                              "ensemble",  "single", "dense",  "adamix",    "latent_skills"};

void check_strategy(const std::string& name) {
  if (std::find(all_strategies.begin(), all_strategies.end(), name) == all_strategies.end())
    throw smear::value_error("smear-resnet: unknown strategy '" + name +
                             "'; known: smear, tag, hash, st_gumbel, reinforce, dselect, ensemble, single, "
                             "dense, adamix, latent_skills");
}

template <class Expert, std::size_t N>
run_result run(const imageset::dataset& d, const smear::safetensors_file& backbone, const run_config& cfg) {
  using net_type = resnet::network<float, Expert, N>;
  const std::size_t classes = d.classes(), domains = d.domain_names.size();
  net_type net{backbone_architecture(backbone), classes, cfg.seed};
  load_backbone(net, backbone);
  net.reset_head(classes, cfg.seed + 101);
  resnet::adapter_config ac;
  ac.conv = cfg.conv;
  ac.reduction = cfg.reduction;
  if (cfg.strategy == "dense") ac.widen = cfg.experts;  // one expert as large as N of them
  ac.layer.routing = cfg.routing;
  ac.layer.routing.hash_seed = cfg.seed;
  if (ac.layer.routing.strategy == smear::strategy::latent_skills) ac.layer.routing.tasks = domains;
  net.add_routing(ac, cfg.seed + 202);
  // what the strategies read: the domain as tag (tag routing, latent skills) and a stable id per
  // image (hash routing)
  std::vector<std::int32_t> tags;
  std::vector<std::uint64_t> ids;
  auto inputs = [&](std::span<const std::size_t> idx) {
    tags.resize(idx.size());
    ids.resize(idx.size());
    for (std::size_t i = 0; i < idx.size(); ++i) {
      tags[i] = d.domains[idx[i]];
      ids[i] = idx[i];
    }
    return smear::route_inputs{.tags = tags, .token_ids = {}, .example_ids = ids};
  };
  std::vector<float> losses;

  auto train = d.indices(0);
  const auto test = d.indices(1);
  std::vector<float> x, dlogits;
  std::vector<std::int32_t> y;
  {  // the routing blocks' standardisation, from (up to 2048) training images
    std::size_t at = 0;
    const std::size_t limit = std::min<std::size_t>(train.size(), 2048);
    net.calibrate_routing([&](std::vector<float>& images, std::size_t& n) {
      if (at >= limit) return false;
      n = std::min<std::size_t>(256, limit - at);
      imageset::batch(d, std::span<const std::size_t>(train.data() + at, n), x);
      images = x;
      at += n;
      return true;
    });
  }
  auto params = net.parameters(false);
  std::size_t trainable = 0;
  for (const auto& p : params) trainable += p.value.size();
  smear::adamw<float> opt{params, {.lr = cfg.lr, .weight_decay = 0.0}};
  smear::rng gen{cfg.seed + 303};
  for (auto& b : net.blocks) b->route->layer().train(true);

  const auto t0 = clock_type::now();
  for (std::size_t ep = 0; ep < cfg.epochs; ++ep) {
    for (std::size_t i = train.size(); i > 1; --i) std::swap(train[i - 1], train[gen.below(i)]);
    double loss_sum = 0;
    std::size_t correct = 0;
    for (std::size_t b0 = 0; b0 < train.size(); b0 += cfg.batch) {
      const std::size_t n = std::min(cfg.batch, train.size() - b0);
      const std::span<const std::size_t> idx(train.data() + b0, n);
      imageset::batch(d, idx, x);
      y.resize(n);
      for (std::size_t i = 0; i < n; ++i) y[i] = d.labels[idx[i]];
      const auto& logits = net.forward(x, n, false, inputs(idx));
      loss_sum += resnet::cross_entropy(logits, std::span<const std::int32_t>(y), classes, dlogits, &losses) *
                  static_cast<double>(n);
      for (std::size_t i = 0; i < n; ++i) {
        const auto first = logits.begin() + static_cast<std::ptrdiff_t>(i * classes);
        correct += (std::max_element(first, first + static_cast<std::ptrdiff_t>(classes)) - first) == y[i];
      }
      net.zero_grad();
      net.backward(dlogits, losses);
      opt.step();
    }
    if (!cfg.quiet)
      std::cout << "  [" << cfg.strategy << " " << (cfg.conv ? "conv" : "adapter") << " N=" << N << " seed "
                << cfg.seed << "] epoch " << ep + 1 << "/" << cfg.epochs << "  loss " << std::setprecision(4)
                << loss_sum / static_cast<double>(train.size()) << "  train acc "
                << static_cast<double>(correct) / static_cast<double>(train.size()) << "  "
                << std::setprecision(3) << seconds_since(t0) << " s" << std::endl << std::setprecision(6);
  }
  run_result r;
  r.train_seconds = seconds_since(t0);
  r.strategy = cfg.strategy;
  r.expert = cfg.conv ? "conv3x3" : "adapter";
  r.experts = N;
  r.seed = cfg.seed;
  r.trainable = trainable;

  // evaluation: accuracy per domain, routing per domain, images per second
  for (auto& b : net.blocks) b->route->layer().train(false);
  std::vector<std::size_t> hit(domains, 0), total(domains, 0);
  r.heat.assign(net.blocks.size(), std::vector<std::vector<double>>(domains, std::vector<double>(N, 0.0)));
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
      const auto first = logits.begin() + static_cast<std::ptrdiff_t>(i * classes);
      const std::size_t dom = d.domains[idx[i]];
      hit[dom] += (std::max_element(first, first + static_cast<std::ptrdiff_t>(classes)) - first) == d.labels[idx[i]];
      ++total[dom];
      for (std::size_t blk = 0; blk < net.blocks.size(); ++blk) {
        const auto p = net.blocks[blk]->route->layer().routing();
        for (std::size_t e = 0; e < N; ++e) r.heat[blk][dom][e] += static_cast<double>(p(i, e));
      }
    }
  }
  for (auto& blk : r.heat)
    for (std::size_t dom = 0; dom < domains; ++dom)
      for (auto& v : blk[dom]) v /= static_cast<double>(std::max<std::size_t>(total[dom], 1));
  double sum = 0;
  for (std::size_t dom = 0; dom < domains; ++dom) {
    r.domain_accuracy.push_back(static_cast<double>(hit[dom]) / static_cast<double>(std::max<std::size_t>(total[dom], 1)));
    sum += r.domain_accuracy.back();
  }
  r.average = sum / static_cast<double>(std::max<std::size_t>(domains, 1));
  r.images_per_second = static_cast<double>(test.size()) / std::max(infer_seconds, 1e-9);
  return r;
}

run_result dispatch(const imageset::dataset& d, const smear::safetensors_file& backbone, run_config cfg) {
  check_strategy(cfg.strategy);
  const bool one = cfg.strategy == "single" || cfg.strategy == "dense";
  cfg.routing = one ? smear::strategy_options{} : smear::parse_strategy(cfg.strategy);
  if (!one && cfg.experts != 6 && cfg.experts != 12)
    throw smear::value_error("smear-resnet: --experts must be 6 or 12 (the instantiated sizes), got " +
                             std::to_string(cfg.experts));
  if (cfg.conv) {
    using E = smear::conv_adapter<float>;
    if (one) return run<E, 1>(d, backbone, cfg);
    return cfg.experts == 6 ? run<E, 6>(d, backbone, cfg) : run<E, 12>(d, backbone, cfg);
  }
  using E = smear::adapter<float>;
  if (one) return run<E, 1>(d, backbone, cfg);
  return cfg.experts == 6 ? run<E, 6>(d, backbone, cfg) : run<E, 12>(d, backbone, cfg);
}

// ---------------------------------------------------------------------------------------------
// reports

double mean_of(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}
double std_of(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(v.size() - 1));
}

std::string pct(const std::vector<double>& v) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(1) << 100 * mean_of(v);
  if (v.size() > 1) o << " ± " << std::setprecision(1) << 100 * std_of(v);
  return o.str();
}

/// One row per (strategy, expert, N), averaged over seeds.
void write_tables(const std::vector<run_result>& results, const std::vector<std::string>& domains,
                  std::ostream& md, std::ostream& csv) {
  md << "| strategy | expert | N | seeds |";
  for (const auto& dn : domains) md << ' ' << dn << " |";
  md << " average | train s | inference img/s | trainable params |\n|---|---|---|---|";
  for (std::size_t i = 0; i < domains.size(); ++i) md << "---|";
  md << "---|---|---|---|\n";
  csv << "strategy,expert,experts,seed";
  for (const auto& dn : domains) csv << ",acc_" << dn;
  csv << ",average,train_seconds,inference_images_per_second,trainable_parameters\n";
  std::vector<std::string> order;
  for (const auto& r : results) {
    const std::string key = r.strategy + "/" + r.expert + "/" + std::to_string(r.experts);
    if (std::find(order.begin(), order.end(), key) == order.end()) order.push_back(key);
    csv << r.strategy << ',' << r.expert << ',' << r.experts << ',' << r.seed;
    for (double a : r.domain_accuracy) csv << ',' << a;
    csv << ',' << r.average << ',' << r.train_seconds << ',' << r.images_per_second << ',' << r.trainable << '\n';
  }
  for (const auto& key : order) {
    std::vector<const run_result*> rs;
    for (const auto& r : results)
      if (r.strategy + "/" + r.expert + "/" + std::to_string(r.experts) == key) rs.push_back(&r);
    const auto& f = *rs.front();
    md << "| " << f.strategy << " | " << f.expert << " | " << f.experts << " | " << rs.size() << " |";
    for (std::size_t dom = 0; dom < domains.size(); ++dom) {
      std::vector<double> v;
      for (auto* r : rs) v.push_back(r->domain_accuracy[dom]);
      md << ' ' << pct(v) << " |";
    }
    std::vector<double> avg, ts, ips;
    for (auto* r : rs) {
      avg.push_back(r->average);
      ts.push_back(r->train_seconds);
      ips.push_back(r->images_per_second);
    }
    md << " **" << pct(avg) << "** | " << std::fixed << std::setprecision(1) << mean_of(ts) << " | "
       << std::setprecision(0) << mean_of(ips) << " | " << f.trainable << " |\n";
    md.unsetf(std::ios::floatfield);
  }
}

/// A domains × experts heatmap per routing block, side by side in one SVG.
void write_heatmap(const run_result& r, const std::vector<std::string>& domains, const fs::path& path) {
  const std::size_t cell = 18, label = 110, gap = 24, top = 54;
  const std::size_t nb = r.heat.size(), N = r.experts, D = domains.size();
  const std::size_t block_w = N * cell + gap;
  const std::size_t W = std::max<std::size_t>(label + nb * block_w + 10, 560), H = top + D * cell + 30;
  std::ofstream o(path);
  if (!o) throw smear::io_error("smear-resnet: cannot write " + path.string());
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << "<text x=\"4\" y=\"14\" font-size=\"13\">" << r.strategy << ", " << r.expert << ", N = " << N
    << ", seed " << r.seed << "</text>\n<text x=\"4\" y=\"28\">mean routing probability on the test images: "
    << "rows = domains, columns = experts</text>\n";
  for (std::size_t dom = 0; dom < D; ++dom)
    o << "<text x=\"4\" y=\"" << top + dom * cell + 13 << "\">" << domains[dom] << "</text>\n";
  for (std::size_t b = 0; b < nb; ++b) {
    const std::size_t x0 = label + b * block_w;
    o << "<text x=\"" << x0 << "\" y=\"" << top - 6 << "\">block " << b + 1 << "</text>\n";
    for (std::size_t dom = 0; dom < D; ++dom)
      for (std::size_t e = 0; e < N; ++e) {
        const double v = std::clamp(r.heat[b][dom][e], 0.0, 1.0);
        const int shade = static_cast<int>(std::lround(255 * (1 - v)));
        o << "<rect x=\"" << x0 + e * cell << "\" y=\"" << top + dom * cell << "\" width=\"" << cell
          << "\" height=\"" << cell << "\" fill=\"rgb(" << shade << ',' << shade << ",255)\" stroke=\"#ccc\"><title>"
          << domains[dom] << ", expert " << e << ": " << v << "</title></rect>\n";
      }
  }
  o << "<text x=\"4\" y=\"" << H - 8 << "\">white = 0, blue = 1</text>\n</svg>\n";
  o.close();
  if (std::system("command -v rsvg-convert >/dev/null 2>&1") == 0) {
    fs::path png = path;
    png.replace_extension(".png");
    const std::string cmd = "rsvg-convert -o '" + png.string() + "' '" + path.string() + "'";
    if (std::system(cmd.c_str()) != 0) std::cerr << "smear-resnet: rsvg-convert failed for " << path << '\n';
  }
}

run_config adaptation_config(const options& o) {
  run_config c;
  const std::string expert = o.get("expert", "adapter");
  if (expert != "adapter" && expert != "conv")
    throw smear::value_error("smear-resnet: --expert must be adapter or conv, got '" + expert + "'");
  c.conv = expert == "conv";
  c.experts = o.count("experts", 6);
  c.reduction = o.count("reduction", 4);
  c.epochs = o.count("epochs", 8);
  c.batch = o.count("batch", 32);
  c.lr = o.number("lr", 1e-3);
  c.quiet = o.has("quiet");
  o.get("quiet", "");
  if (c.batch == 0 || c.reduction == 0) throw smear::value_error("smear-resnet: --batch and --reduction must be positive");
  return c;
}

std::vector<run_result> compare(const imageset::dataset& d, const fs::path& backbone_path,
                                const std::vector<std::string>& strategies, const std::vector<std::uint64_t>& seeds,
                                run_config base, const fs::path& out_dir, const fs::path& csv_path,
                                const fs::path& md_path) {
  for (const auto& s : strategies) check_strategy(s);
  const auto backbone = smear::safetensors_file::open(backbone_path);
  fs::create_directories(out_dir);
  std::vector<run_result> results;
  std::size_t done = 0;
  const auto t0 = clock_type::now();
  for (const auto& s : strategies)
    for (auto seed : seeds) {
      run_config c = base;
      c.strategy = s;
      c.seed = seed;
      std::cout << "compare: run " << ++done << "/" << strategies.size() * seeds.size() << ": " << s
                << " seed " << seed << " (" << std::fixed << std::setprecision(1) << seconds_since(t0) << " s so far)"
                << std::endl;
      std::cout.unsetf(std::ios::floatfield);
      results.push_back(dispatch(d, backbone, c));
      const auto& r = results.back();
      std::cout << "compare: " << s << " seed " << seed << ": average accuracy " << std::fixed << std::setprecision(4)
                << r.average << ", " << std::setprecision(1) << r.train_seconds << " s training" << std::endl;
      std::cout.unsetf(std::ios::floatfield);
      if (r.experts > 1)
        write_heatmap(r, d.domain_names, out_dir / ("heatmap-" + s + "-" + r.expert + "-N" + std::to_string(r.experts) +
                                                    "-seed" + std::to_string(seed) + ".svg"));
    }
  std::ostringstream md, csv;
  write_tables(results, d.domain_names, md, csv);
  std::cout << "\n" << md.str() << std::endl;
  std::ofstream(md_path) << md.str();
  std::ofstream(csv_path) << csv.str();
  std::cout << "compare: wrote " << md_path.string() << ", " << csv_path.string() << " and heatmaps in "
            << out_dir.string() << std::endl;
  return results;
}

std::vector<std::uint64_t> parse_seeds(const options& o) {
  std::vector<std::uint64_t> out;
  for (const auto& s : o.list("seeds", "0")) out.push_back(std::stoull(s));
  return out;
}

std::vector<std::string> parse_strategies(const options& o) {
  auto v = o.list("strategies", "");
  if (v.empty()) v = all_strategies;
  return v;
}

int main_impl(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "help" || std::string(argv[1]) == "--help") {
    std::cout << usage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  options o(argc, argv, 2);
  const fs::path data = o.get("data", default_data().string());
  // One thread by default: on a shared or small machine, OpenMP threads spinning at barriers
  // cost more than they bring for these small GEMMs.
  const int threads = static_cast<int>(o.count("threads", 1));
  Eigen::setNbThreads(threads);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif

  if (cmd == "make-tiny") {
    if (o.positional().size() != 1) throw smear::value_error("usage: smear-resnet make-tiny DIR");
    const fs::path dir = o.positional()[0];
    fs::create_directories(dir);
    const auto seed = static_cast<std::uint64_t>(o.count("seed", 0));
    imageset::write(dir / "emoji.bin", imageset::make_tiny(seed, 4, 3, 30, 16));
    auto pre = imageset::make_tiny(seed + 1, 6, 1, 40, 16);
    pre.class_names.clear();
    pre.domain_names.clear();
    imageset::write(dir / "pretrain.bin", pre);
    o.check_all_used();
    std::cout << "make-tiny: wrote " << (dir / "emoji.bin").string() << " and " << (dir / "pretrain.bin").string() << '\n';
    return 0;
  }
  if (cmd == "pretrain" || cmd == "quick") {
    pretrain_config pc;
    const bool quick = cmd == "quick";
    pc.arch.width = o.count("width", quick ? 8 : 16);
    pc.arch.blocks = parse_blocks(o.list("blocks", quick ? "1,1,1,1" : "2,2,2,2"));
    pc.arch.stem_stride = o.count("stem-stride", 2);
    pc.epochs = o.count(quick ? "pretrain-epochs" : "epochs", 1);
    pc.limit = o.count(quick ? "pretrain-limit" : "limit", quick ? 10000 : 0);
    pc.batch = o.count(quick ? "pretrain-batch" : "batch", 64);
    pc.lr = o.number(quick ? "pretrain-lr" : "lr", 1e-3);
    pc.seed = static_cast<std::uint64_t>(o.count("seed", 0));
    pc.invert = o.has("invert") ? static_cast<int>(o.count("invert", 1)) : -1;
    pc.quiet = o.has("quiet");
    o.get("quiet", "");
    const fs::path pre_file = o.get("pretrain-data", (data / "mnist.bin").string());
    if (!quick) {
      const fs::path out = o.get("out", "backbone.safetensors");
      o.check_all_used();
      pretrain(pre_file, out, pc);
      return 0;
    }
    const fs::path out_dir = o.get("out", "results-quick");
    fs::create_directories(out_dir);
    const fs::path bb = out_dir / "backbone.safetensors";
    run_config rc = adaptation_config(o);
    if (!o.has("epochs")) rc.epochs = 3;
    const auto strategies = parse_strategies(o);
    const auto seeds = parse_seeds(o);
    o.check_all_used();
    const auto d = load_emoji(data);
    pretrain(pre_file, bb, pc);
    compare(d, bb, strategies, seeds, rc, out_dir, out_dir / "compare.csv", out_dir / "compare.md");
    return 0;
  }
  if (cmd == "train" || cmd == "compare") {
    const fs::path bb = o.get("backbone", "backbone.safetensors");
    run_config rc = adaptation_config(o);
    const fs::path out_dir = o.get("out", "results");
    if (cmd == "train") {
      rc.strategy = o.get("strategy", "smear");
      rc.seed = static_cast<std::uint64_t>(o.count("seed", 0));
      o.check_all_used();
      const auto d = load_emoji(data);
      const auto r = dispatch(d, smear::safetensors_file::open(bb), rc);
      std::ostringstream md, csv;
      write_tables({r}, d.domain_names, md, csv);
      std::cout << "\n" << md.str();
      if (r.experts > 1) {
        fs::create_directories(out_dir);
        write_heatmap(r, d.domain_names, out_dir / ("heatmap-" + r.strategy + ".svg"));
      }
      return 0;
    }
    const auto strategies = parse_strategies(o);
    const auto seeds = parse_seeds(o);
    const fs::path csv = o.get("csv", (out_dir / "compare.csv").string());
    const fs::path md = o.get("markdown", (out_dir / "compare.md").string());
    o.check_all_used();
    const auto d = load_emoji(data);
    compare(d, bb, strategies, seeds, rc, out_dir, csv, md);
    return 0;
  }
  throw smear::value_error("smear-resnet: unknown command '" + cmd + "' (see `smear-resnet help`)");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return main_impl(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
    return 1;
  }
}
