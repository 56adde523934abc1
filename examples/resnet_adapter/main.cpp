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
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <smear/io/safetensors.hpp>
#include <smear/smear.hpp>

#include "common/args.hpp"
#include "common/heatmap.hpp"
#include "common/methods.hpp"
#include "common/table.hpp"
#include "dataset.hpp"
#include "train.hpp"

namespace {

namespace fs = std::filesystem;
using resnet::run_config;
using resnet::run_result;

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

imageset::dataset load_emoji(const fs::path& dir) {
  const fs::path file = dir / "emoji.bin";
  if (!fs::exists(file))
    throw smear::io_error("smear-resnet: " + file.string() +
                          " not found; run examples/resnet_adapter/prepare_data first (or pass --data DIR)");
  return imageset::read(file);
}

// ---------------------------------------------------------------------------------------------
// reports

/// One row per (strategy, expert, N), averaged over seeds; the CSV has one line per run.
void write_tables(const std::vector<run_result>& results, const std::vector<std::string>& domains,
                  std::ostream& md, std::ostream& csv) {
  std::vector<std::string> columns{"strategy", "expert", "N", "seeds"};
  columns.insert(columns.end(), domains.begin(), domains.end());
  for (const char* c : {"average", "train s", "inference img/s", "trainable params"}) columns.push_back(c);
  md << examples::markdown_header(columns);
  csv << "strategy,expert,experts,seed";
  for (const auto& dn : domains) csv << ",acc_" << dn;
  csv << ",average,train_seconds,inference_images_per_second,trainable_parameters\n";
  auto key = [](const run_result& r) { return r.strategy + "/" + r.expert + "/" + std::to_string(r.experts); };
  std::vector<std::string> order;
  for (const auto& r : results) {
    if (std::find(order.begin(), order.end(), key(r)) == order.end()) order.push_back(key(r));
    csv << r.strategy << ',' << r.expert << ',' << r.experts << ',' << r.seed;
    for (double a : r.domain_accuracy) csv << ',' << a;
    csv << ',' << r.average << ',' << r.train_seconds << ',' << r.images_per_second << ',' << r.trainable << '\n';
  }
  for (const auto& k : order) {
    std::vector<const run_result*> rs;
    for (const auto& r : results)
      if (key(r) == k) rs.push_back(&r);
    const auto& f = *rs.front();
    std::vector<std::string> cells{f.strategy, f.expert, std::to_string(f.experts), std::to_string(rs.size())};
    for (std::size_t dom = 0; dom < domains.size(); ++dom) {
      std::vector<double> v;
      for (auto* r : rs) v.push_back(r->domain_accuracy[dom]);
      cells.push_back(examples::mean_std(v, 100, 1));
    }
    std::vector<double> avg, ts, ips;
    for (auto* r : rs) {
      avg.push_back(r->average);
      ts.push_back(r->train_seconds);
      ips.push_back(r->images_per_second);
    }
    cells.push_back("**" + examples::mean_std(avg, 100, 1) + "**");
    cells.push_back(examples::fixed(examples::mean(ts), 1));
    cells.push_back(examples::fixed(examples::mean(ips), 0));
    cells.push_back(std::to_string(f.trainable));
    md << examples::markdown_row(cells);
  }
}

/// A domains × experts heatmap per routing block, in one SVG (and a PNG copy).
void write_heatmap(const run_result& r, const std::vector<std::string>& domains, const fs::path& path) {
  examples::heatmap h;
  h.title = r.strategy + ", " + r.expert + ", N = " + std::to_string(r.experts) + ", seed " + std::to_string(r.seed);
  h.subtitle = "mean routing probability on the test images: rows = domains, columns = experts";
  h.rows = domains;
  h.columns = r.experts;
  h.darkest = 1;
  for (std::size_t b = 0; b < r.routing.size(); ++b)
    h.panels.push_back({"block " + std::to_string(b + 1), r.routing[b]});
  examples::write_heatmap(h, path);
}

// ---------------------------------------------------------------------------------------------
// commands

run_config adaptation_config(const examples::arguments& o) {
  run_config c;
  const std::string expert = o.text("expert", "adapter");
  if (expert != "adapter" && expert != "conv") throw o.error("--expert must be adapter or conv, got '" + expert + "'");
  c.conv = expert == "conv";
  c.experts = o.count("experts", 6);
  c.reduction = o.count("reduction", 4);
  c.epochs = o.count("epochs", 8);
  c.batch = o.count("batch", 32);
  c.lr = o.real("lr", 1e-3);
  c.quiet = o.flag("quiet");
  if (c.batch == 0 || c.reduction == 0) throw o.error("--batch and --reduction must be positive");
  return c;
}

std::vector<run_result> compare(const imageset::dataset& d, const fs::path& backbone_path,
                                const std::vector<std::string>& strategies, const std::vector<std::uint64_t>& seeds,
                                run_config base, const fs::path& out_dir, const fs::path& csv_path,
                                const fs::path& md_path) {
  for (const auto& s : strategies) resnet::check_strategy(s);
  const auto backbone = smear::safetensors_file::open(backbone_path);
  fs::create_directories(out_dir);
  std::vector<run_result> results;
  std::size_t done = 0;
  const auto t0 = resnet::clock_type::now();
  for (const auto& s : strategies)
    for (auto seed : seeds) {
      run_config c = base;
      c.strategy = s;
      c.seed = seed;
      std::cout << "compare: run " << ++done << "/" << strategies.size() * seeds.size() << ": " << s << " seed "
                << seed << " (" << std::fixed << std::setprecision(1) << resnet::seconds_since(t0) << " s so far)"
                << std::endl;
      std::cout.unsetf(std::ios::floatfield);
      results.push_back(resnet::adapt(d, backbone, c));
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

std::vector<std::uint64_t> parse_seeds(const examples::arguments& o) {
  std::vector<std::uint64_t> out;
  for (auto s : o.counts("seeds", {0})) out.push_back(static_cast<std::uint64_t>(s));
  return out;
}

/// The --strategies list, every method by default; with the convolutional adapter the default
/// leaves out soft_moe, which needs an expert that acts per position (asking for it explicitly
/// gives the layer's error).
std::vector<std::string> parse_strategies(const examples::arguments& o, bool conv) {
  auto v = o.list("strategies", "");
  if (v.empty()) {
    v = examples::all_methods();
    if (conv) std::erase(v, std::string("soft_moe"));
  }
  return v;
}

int main_impl(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "help" || std::string(argv[1]) == "--help") {
    std::cout << usage;
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  const examples::arguments o{"smear-resnet", argc, argv, 2, {"quiet"}};
  const fs::path data = o.text("data", (examples::data_root() / "resnet" / "emoji-32").string());
  // One thread by default: these GEMMs are small, and waking a second thread for each costs
  // about what it brings.
  const std::size_t threads = o.count("threads", 1);
  const smear::backend::thread_limit limit(threads);  // everything smear runs from main

  if (cmd == "make-tiny") {
    if (o.positional().size() != 1) throw smear::value_error("usage: smear-resnet make-tiny DIR");
    const fs::path dir = o.positional()[0];
    const auto seed = static_cast<std::uint64_t>(o.count("seed", 0));
    o.finish();
    fs::create_directories(dir);
    imageset::write(dir / "emoji.bin", imageset::make_tiny(seed, 4, 3, 30, 16));
    auto pre = imageset::make_tiny(seed + 1, 6, 1, 40, 16);
    pre.class_names.clear();
    pre.domain_names.clear();
    imageset::write(dir / "pretrain.bin", pre);
    std::cout << "make-tiny: wrote " << (dir / "emoji.bin").string() << " and " << (dir / "pretrain.bin").string() << '\n';
    return 0;
  }
  if (cmd == "pretrain" || cmd == "quick") {
    resnet::pretrain_config pc;
    const bool quick = cmd == "quick";
    pc.arch.width = o.count("width", quick ? 8 : 16);
    pc.arch.blocks = o.counts("blocks", std::vector<std::size_t>(4, quick ? std::size_t{1} : std::size_t{2}));
    if (pc.arch.blocks.empty()) throw o.error("--blocks needs at least one stage");
    pc.arch.stem_stride = o.count("stem-stride", 2);
    pc.epochs = o.count(quick ? "pretrain-epochs" : "epochs", 1);
    pc.limit = o.count(quick ? "pretrain-limit" : "limit", quick ? 10000 : 0);
    pc.batch = o.count(quick ? "pretrain-batch" : "batch", 64);
    pc.lr = o.real(quick ? "pretrain-lr" : "lr", 1e-3);
    pc.seed = static_cast<std::uint64_t>(o.count("seed", 0));
    pc.invert = o.has("invert") ? static_cast<int>(o.count("invert", 1)) : -1;
    pc.quiet = o.flag("quiet");
    const fs::path pre_file = o.text("pretrain-data", (data / "mnist.bin").string());
    if (!quick) {
      const fs::path out = o.text("out", "backbone.safetensors");
      o.finish();
      resnet::pretrain(pre_file, out, pc);
      return 0;
    }
    const fs::path out_dir = o.text("out", "results-quick");
    fs::create_directories(out_dir);
    const fs::path bb = out_dir / "backbone.safetensors";
    run_config rc = adaptation_config(o);
    if (!o.has("epochs")) rc.epochs = 3;
    const auto strategies = parse_strategies(o, rc.conv);
    const auto seeds = parse_seeds(o);
    o.finish();
    const auto d = load_emoji(data);
    resnet::pretrain(pre_file, bb, pc);
    compare(d, bb, strategies, seeds, rc, out_dir, out_dir / "compare.csv", out_dir / "compare.md");
    return 0;
  }
  if (cmd == "train" || cmd == "compare") {
    const fs::path bb = o.text("backbone", "backbone.safetensors");
    run_config rc = adaptation_config(o);
    const fs::path out_dir = o.text("out", "results");
    if (cmd == "train") {
      rc.strategy = o.text("strategy", "smear");
      rc.seed = static_cast<std::uint64_t>(o.count("seed", 0));
      o.finish();
      const auto d = load_emoji(data);
      const auto r = resnet::adapt(d, smear::safetensors_file::open(bb), rc);
      std::ostringstream md, csv;
      write_tables({r}, d.domain_names, md, csv);
      std::cout << "\n" << md.str();
      if (r.experts > 1) {
        fs::create_directories(out_dir);
        write_heatmap(r, d.domain_names, out_dir / ("heatmap-" + r.strategy + ".svg"));
      }
      return 0;
    }
    const auto strategies = parse_strategies(o, rc.conv);
    const auto seeds = parse_seeds(o);
    const fs::path csv = o.text("csv", (out_dir / "compare.csv").string());
    const fs::path md = o.text("markdown", (out_dir / "compare.md").string());
    o.finish();
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
