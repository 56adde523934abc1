// smear-t5: the SMEAR paper's T5-GLUE experiment in miniature, on real text.
//
// A small T5 encoder is pre-trained on the training text with masked-token prediction, saved
// as safetensors and frozen; a routing block of 8 adapter experts goes after each attention and
// feed-forward sublayer, with one classification head per task; adapters, routers and heads
// train on mixed-task batches. `compare` runs every routing strategy and writes a table and
// routing heatmaps.
//
// Usage:
//   smear-t5 compare  [options]   every method (or --methods a,b,...): results.md, results.csv, SVG heatmaps
//   smear-t5 train    [options]   one method (--method NAME)
//   smear-t5 pretrain [options]   only (re)build the backbone
//   smear-t5 tiny-data DIR        write a small generated data set (for tests; no download)
// Options:
//   --data DIR           prepare_data's output (default ${SMEAR_DATA:-~/.cache/smear}/t5)
//   --out DIR            where results go (default smear-t5-out)
//   --backbone FILE      backbone safetensors; pre-trained and written there when absent
//                        (default DATA/backbone.safetensors; a Hugging Face T5 file loads too)
//   --methods LIST       comma-separated, from: smear tag hash st_gumbel reinforce dselect
//                        ensemble single dense adamix latent_skills (default: all)
//   --method NAME        for `train` (default smear)
//   --seeds N            seeds 1..N per method, mean ± std in the table (default 1)
//   --steps N            adapter training steps (default 600)   --batch N (default 32)
//   --lr X               AdamW learning rate (default 3e-3)     --bottleneck M (default 8)
//   --eval-every N       validation every N steps (default 100) --eval-limit N (default 0: all)
//   --pretrain-steps N   backbone pre-training steps (default 8000, about 25 min on one core)
//   --pretrain-lr X      backbone pre-training learning rate (default 5e-4)
//   --d-model N --layers N --heads N --d-kv N --d-ff N --relu   backbone shape (default 64, 4, 4, 16, 128, gated-GELU)
//   --max-len N          tokens per example (default 64)
//   --vocab N            embedding rows (default: the SentencePiece vocabulary + 1 mask id); e.g.
//                        32128 with --d-model 512 --layers 6 --heads 8 --d-kv 64 --d-ff 2048 --relu for
//                        Hugging Face's t5-small model.safetensors and data tokenised with its spiece.model
//   --quick              a few minutes on 2 cores: 150 steps, 250 pre-training steps, 500 validation examples

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "model.hpp"

namespace {

struct cli {
  std::string command, data, out = "smear-t5-out", backbone, method = "smear";
  std::vector<std::string> methods = t5ex::all_methods();
  std::size_t seeds = 1, pretrain_steps = 8000, max_len = 64, vocab = 0;
  double pretrain_lr = 5e-4;
  t5ex::train_options train;
  t5ex::t5_config cfg{.d_model = 64, .d_kv = 16, .num_heads = 4, .d_ff = 128, .num_layers = 4, .gated_gelu = true};
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string x; std::getline(in, x, sep);)
    if (!x.empty()) out.push_back(x);
  return out;
}

cli parse(int argc, char** argv) {
  cli c;
  c.train.steps = 600;
  if (argc < 2) throw smear::value_error("usage: smear-t5 compare|train|pretrain|tiny-data [options] (see main.cpp)");
  c.command = argv[1];
  const char* env = std::getenv("SMEAR_DATA");
  const char* home = std::getenv("HOME");
  c.data = (env ? std::string(env) : std::string(home ? home : ".") + "/.cache/smear") + "/t5";
  bool quick = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw smear::value_error("smear-t5: " + a + " needs a value");
      return argv[++i];
    };
    auto number = [&]() -> std::size_t {
      const std::string v = value();
      char* end = nullptr;
      const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
      if (end == v.c_str() || *end != '\0') throw smear::value_error("smear-t5: " + a + " expects a number, got '" + v + "'");
      return static_cast<std::size_t>(n);
    };
    if (a == "--data") c.data = value();
    else if (a == "--out") c.out = value();
    else if (a == "--backbone") c.backbone = value();
    else if (a == "--methods") c.methods = split(value(), ',');
    else if (a == "--method") c.method = value();
    else if (a == "--seeds") c.seeds = number();
    else if (a == "--steps") c.train.steps = number();
    else if (a == "--batch") c.train.batch = number();
    else if (a == "--lr") c.train.lr = std::stod(value());
    else if (a == "--bottleneck") c.train.bottleneck = number();
    else if (a == "--eval-every") c.train.eval_every = number();
    else if (a == "--eval-limit") c.train.eval_limit = number();
    else if (a == "--pretrain-steps") c.pretrain_steps = number();
    else if (a == "--pretrain-lr") c.pretrain_lr = std::stod(value());
    else if (a == "--d-model") c.cfg.d_model = number();
    else if (a == "--layers") c.cfg.num_layers = number();
    else if (a == "--heads") c.cfg.num_heads = number();
    else if (a == "--d-kv") c.cfg.d_kv = number();
    else if (a == "--d-ff") c.cfg.d_ff = number();
    else if (a == "--relu") c.cfg.gated_gelu = false;
    else if (a == "--max-len") c.max_len = number();
    else if (a == "--vocab") c.vocab = number();
    else if (a == "--quick") quick = true;
    else if (c.command == "tiny-data" && a[0] != '-') c.out = a;
    else throw smear::value_error("smear-t5: unknown option '" + a + "'");
  }
  if (quick) {
    c.train.steps = std::min<std::size_t>(c.train.steps, 150);
    c.train.eval_every = 75;
    c.train.eval_limit = 500;
    c.pretrain_steps = std::min<std::size_t>(c.pretrain_steps, 250);
  }
  if (c.seeds == 0 || c.train.steps == 0 || c.train.batch == 0 || c.train.eval_every == 0)
    throw smear::value_error("smear-t5: --seeds, --steps, --batch and --eval-every must be positive");
  for (const auto& m : c.methods)
    if (std::find(t5ex::all_methods().begin(), t5ex::all_methods().end(), m) == t5ex::all_methods().end())
      throw smear::value_error("smear-t5: unknown method '" + m + "'");
  if (c.backbone.empty()) c.backbone = c.data + "/backbone.safetensors";
  return c;
}

/// The vocabulary: SentencePiece's pieces (spiece.vocab) or the largest id seen, plus one mask id.
std::size_t vocabulary(const cli& c, const t5ex::dataset& d) {
  std::size_t v = static_cast<std::size_t>(d.max_id) + 1;
  std::ifstream in(c.data + "/spiece.vocab");
  if (in) {
    std::size_t lines = 0;
    for (std::string l; std::getline(in, l);) ++lines;
    v = std::max(v, lines);
  }
  return v + 1;
}

/// Loads the backbone, or pre-trains one and saves it.
void backbone(const cli& c, t5ex::t5_encoder& enc, const t5ex::dataset& d, bool force) {
  if (!force && std::filesystem::exists(c.backbone)) {
    enc.load(c.backbone);
    std::fprintf(stderr, "loaded backbone %s\n", c.backbone.c_str());
    return;
  }
  std::fprintf(stderr, "pre-training the backbone (%zu layers, d = %zu, %zu parameters) for %zu steps\n",
               enc.config().num_layers, enc.config().d_model, enc.values().size(), c.pretrain_steps);
  enc.initialize(12345);
  t5ex::pretrain(enc, d, {.steps = c.pretrain_steps, .batch = c.train.batch, .lr = c.pretrain_lr, .seed = 7});
  enc.save(c.backbone, {{"format", "pt"}, {"objective", "masked-token prediction"},
                        {"steps", std::to_string(c.pretrain_steps)}});
  std::fprintf(stderr, "saved backbone %s\n", c.backbone.c_str());
}

std::string mean_std(const std::vector<double>& v, double scale, int digits) {
  double m = 0, s = 0;
  for (double x : v) m += x / static_cast<double>(v.size());
  for (double x : v) s += (x - m) * (x - m);
  char buf[64];
  if (v.size() > 1)
    std::snprintf(buf, sizeof buf, "%.*f ± %.*f", digits, m * scale, digits,
                  std::sqrt(s / static_cast<double>(v.size() - 1)) * scale);
  else
    std::snprintf(buf, sizeof buf, "%.*f", digits, m * scale);
  return buf;
}

/// One SVG: for each routing block a tasks × experts grid of the mean routing probability.
void write_heatmap(const std::string& path, const std::string& method, const std::vector<t5ex::task_info>& tasks,
                   const std::vector<std::vector<double>>& routing, std::size_t experts) {
  const int cell = 18, label = 130, top = 40, gap = 30, cols = 4;
  const int pw = label + static_cast<int>(experts) * cell, ph = 24 + static_cast<int>(tasks.size()) * cell;
  const int rows = (static_cast<int>(routing.size()) + cols - 1) / cols;
  double top_p = 1e-9;
  for (const auto& r : routing)
    for (double p : r) top_p = std::max(top_p, p);
  std::ofstream f(path);
  f << "<svg xmlns='http://www.w3.org/2000/svg' width='" << cols * (pw + gap) << "' height='" << top + rows * (ph + gap)
    << "' font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
    << "<text x='10' y='20' font-size='14'>" << method
    << ": mean routing probability on the test set, tasks (rows) × experts (columns), per routing block; "
    << "white = 0, darkest = " << top_p << "</text>\n";
  for (std::size_t k = 0; k < routing.size(); ++k) {
    const int x0 = static_cast<int>(k % cols) * (pw + gap), y0 = top + static_cast<int>(k / cols) * (ph + gap);
    f << "<text x='" << x0 + label << "' y='" << y0 + 12 << "'>layer " << k / 2 << (k % 2 ? " feed-forward" : " attention")
      << "</text>\n";
    for (std::size_t t = 0; t < tasks.size(); ++t) {
      const int y = y0 + 18 + static_cast<int>(t) * cell;
      f << "<text x='" << x0 + label - 4 << "' y='" << y + 13 << "' text-anchor='end'>" << tasks[t].name << "</text>\n";
      for (std::size_t e = 0; e < experts; ++e) {
        const double p = std::clamp(routing[k][t * experts + e], 0.0, 1.0);
        const int shade = static_cast<int>(255.0 * (1.0 - p / top_p));
        f << "<rect x='" << x0 + label + static_cast<int>(e) * cell << "' y='" << y << "' width='" << cell - 1
          << "' height='" << cell - 1 << "' fill='rgb(" << shade << "," << shade << ",255)'><title>" << tasks[t].name
          << ", expert " << e << ": " << p << "</title></rect>\n";
      }
    }
  }
  f << "</svg>\n";
}

int compare(const cli& c, t5ex::t5_encoder& enc, const t5ex::dataset& d) {
  std::filesystem::create_directories(c.out);
  struct row {
    std::vector<std::vector<double>> per_task;  // [seed][task]
    std::vector<double> average, train_s, infer, best_step;
    std::size_t trainable = 0;
  };
  std::map<std::string, row> rows;
  std::ofstream csv(c.out + "/results.csv");
  csv << "method,seed";
  for (const auto& t : d.tasks) csv << "," << t.name;
  csv << ",average,best_validation,best_step,train_seconds,inference_examples_per_s,trainable_parameters\n";
  for (std::size_t seed = 1; seed <= c.seeds; ++seed)
    for (const auto& m : c.methods) {
      t5ex::train_options o = c.train;
      o.method = m;
      o.seed = seed;
      std::fprintf(stderr, "== %s, seed %zu: %zu steps of batch %zu\n", m.c_str(), seed, o.steps, o.batch);
      const t5ex::train_result r =
          t5ex::train_classifier(enc, d, o, c.out + "/" + m + "_seed" + std::to_string(seed) + ".safetensors");
      auto& rw = rows[m];
      rw.per_task.push_back(r.test.accuracy);
      rw.average.push_back(r.test.average);
      rw.train_s.push_back(r.train_seconds);
      rw.infer.push_back(r.test.examples_per_s);
      rw.trainable = r.trainable;
      csv << m << "," << seed;
      for (double a : r.test.accuracy) csv << "," << a;
      csv << "," << r.test.average << "," << r.best_validation << "," << r.best_step << "," << r.train_seconds << ","
          << r.test.examples_per_s << "," << r.trainable << "\n";
      csv.flush();
      std::fprintf(stderr, "== %s, seed %zu: test average %.4f (best validation %.4f at step %zu), %s training\n",
                   m.c_str(), seed, r.test.average, r.best_validation, r.best_step, t5ex::duration(r.train_seconds).c_str());
      if (seed == 1 && !r.test.routing.empty() && r.test.routing[0].size() == d.tasks.size() * t5ex::experts_per_block)
        write_heatmap(c.out + "/routing_" + m + ".svg", m, d.tasks, r.test.routing, t5ex::experts_per_block);
    }
  std::ostringstream md;
  md << "| method |";
  for (const auto& t : d.tasks) md << " " << t.name << " |";
  md << " average | training time (s) | inference (examples/s) | trainable parameters |\n|---|";
  for (std::size_t i = 0; i < d.tasks.size() + 4; ++i) md << "---|";
  md << "\n";
  for (const auto& m : c.methods) {
    const auto& rw = rows[m];
    md << "| " << m << " |";
    for (std::size_t t = 0; t < d.tasks.size(); ++t) {
      std::vector<double> v;
      for (const auto& s : rw.per_task) v.push_back(s[t]);
      md << " " << mean_std(v, 100, 1) << " |";
    }
    md << " **" << mean_std(rw.average, 100, 1) << "** | " << mean_std(rw.train_s, 1, 0) << " | "
       << mean_std(rw.infer, 1, 0) << " | " << rw.trainable << " |\n";
  }
  std::ofstream(c.out + "/results.md") << md.str();
  std::printf("%s", md.str().c_str());
  std::fprintf(stderr, "wrote %s/results.md, %s/results.csv and %s/routing_*.svg\n", c.out.c_str(), c.out.c_str(),
               c.out.c_str());
  // PNG copies where a converter is installed
  if (std::system("command -v rsvg-convert > /dev/null 2>&1") == 0)
    for (const auto& m : c.methods) {
      const std::string svg = c.out + "/routing_" + m + ".svg";
      if (std::filesystem::exists(svg))
        if (std::system(("rsvg-convert -o '" + c.out + "/routing_" + m + ".png' '" + svg + "'").c_str()) != 0)
          std::fprintf(stderr, "rsvg-convert failed for %s\n", svg.c_str());
    }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    cli c = parse(argc, argv);
    if (c.command == "tiny-data") {
      std::filesystem::create_directories(c.out);
      t5ex::write_tiny_dataset(c.out, 3, 96, 5);
      std::printf("wrote a tiny generated data set to %s\n", c.out.c_str());
      return 0;
    }
    if (c.command != "compare" && c.command != "train" && c.command != "pretrain")
      throw smear::value_error("smear-t5: unknown command '" + c.command + "' (compare, train, pretrain, tiny-data)");
    const t5ex::dataset d = t5ex::read_dataset(c.data, c.max_len);
    c.cfg.vocab_size = c.vocab != 0 ? c.vocab : vocabulary(c, d);
    if (c.cfg.vocab_size <= static_cast<std::size_t>(d.max_id) + 1)
      throw smear::value_error(smear::detail::message("smear-t5: --vocab ", c.cfg.vocab_size,
                                                      " must exceed the largest token id + 1 = ", d.max_id + 1,
                                                      " (the last id is the mask)"));
    std::fprintf(stderr, "data %s: %zu tasks, %zu / %zu / %zu train / validation / test examples, vocabulary %zu\n",
                 c.data.c_str(), d.tasks.size(), d.train.size(), d.validation.size(), d.test.size(), c.cfg.vocab_size);
    t5ex::t5_encoder enc{c.cfg};
    backbone(c, enc, d, c.command == "pretrain");
    if (c.command == "pretrain") return 0;
    if (c.command == "train") {
      t5ex::train_options o = c.train;
      o.method = c.method;
      std::filesystem::create_directories(c.out);
      const auto r = t5ex::train_classifier(enc, d, o, c.out + "/" + o.method + ".safetensors");
      for (std::size_t t = 0; t < d.tasks.size(); ++t)
        std::printf("%-20s %.4f\n", d.tasks[t].name.c_str(), r.test.accuracy[t]);
      std::printf("%-20s %.4f  (best validation %.4f at step %zu, %.1f s training, %.0f test examples/s)\n", "average",
                  r.test.average, r.best_validation, r.best_step, r.train_seconds, r.test.examples_per_s);
      return 0;
    }
    return compare(c, enc, d);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
