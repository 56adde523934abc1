// smear-t5: the SMEAR paper's T5-GLUE experiment in miniature, on real text.
//
// A small T5 encoder is pre-trained on the training text with masked-token prediction, saved
// as safetensors and frozen; a routing block of 8 adapter experts goes after each attention and
// feed-forward sublayer, with one classification head per task; adapters, routers and heads
// train on mixed-task batches. `compare` runs every routing strategy and writes a table and
// routing heatmaps.
//
//   smear-t5 compare  [options]   every method: results.md, results.csv, heatmaps
//   smear-t5 train    [options]   one method (--method NAME)
//   smear-t5 pretrain [options]   only (re)build the backbone
//   smear-t5 tiny-data DIR        a small generated data set (tests; no download)
//   mpirun -np R smear-t5 train   data-parallel training over R processes (built with MPI)
//
// Run `smear-t5 help` for every option.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/args.hpp"
#include "common/heatmap.hpp"
#include "common/methods.hpp"
#include "common/table.hpp"
#include "model.hpp"
#include "pretrain.hpp"

namespace {

const char* usage = R"(smear-t5: SMEAR routing blocks of adapter experts in a frozen T5 encoder, multi-task text classification

commands:
  compare  [options]   every method (or --methods a,b,...): results.md, results.csv, SVG heatmaps
  train    [options]   one method (--method NAME)
  pretrain [options]   only (re)build the backbone
  tiny-data DIR        write a small generated data set (for tests; no download)

options:
  --data DIR           prepare_data's output (default ${SMEAR_DATA:-~/.cache/smear}/t5)
  --out DIR            where results go (default smear-t5-out)
  --backbone FILE      backbone safetensors; pre-trained and written there when absent
                       (default DATA/backbone.safetensors; a Hugging Face T5 file loads too)
  --methods LIST       comma-separated, from: smear tag hash st_gumbel reinforce dselect
                       ensemble single dense adamix latent_skills (default: all)
  --method NAME        for `train` (default smear)
  --seeds N            seeds 1..N per method, mean ± std in the table (default 1)
  --steps N            adapter training steps (default 600)   --batch N (default 32)
  --lr X               AdamW learning rate (default 3e-3)     --bottleneck M (default 8)
  --eval-every N       validation every N steps (default 100) --eval-limit N (default 0: all)
  --pretrain-steps N   backbone pre-training steps (default 8000, about 25 min on one core)
  --pretrain-lr X      backbone pre-training learning rate (default 5e-4)
  --d-model N --layers N --heads N --d-kv N --d-ff N --relu   backbone shape (default 64, 4, 4, 16, 128, gated-GELU)
  --max-len N          tokens per example (default 64)
  --vocab N            embedding rows (default: the SentencePiece vocabulary + 1 mask id); e.g.
                       32128 with --d-model 512 --layers 6 --heads 8 --d-kv 64 --d-ff 2048 --relu for
                       Hugging Face's t5-small model.safetensors and data tokenised with its spiece.model
  --quick              a few minutes on 2 cores: 150 steps, 250 pre-training steps, 500 validation examples

data parallelism (a build with MPI): `mpirun -np R smear-t5 train ...` trains on R processes, each on
its share of every batch (--batch is the whole batch, at least R), with gradients averaged after each
routing block's backward: the same training as one process, up to the order of float sums. Process 0
reports and writes; the backbone must exist (run `smear-t5 pretrain` first). Each process's thread
pool gets the machine's CPUs / R threads unless SMEAR_NUM_THREADS says otherwise.
)";

struct cli {
  std::string command, data, out = "smear-t5-out", backbone, method = "smear";
  std::vector<std::string> methods = examples::all_methods();
  std::size_t seeds = 1, pretrain_steps = 8000, max_len = 64, vocab = 0;
  double pretrain_lr = 5e-4;
  t5ex::train_options train;
  t5ex::t5_config cfg{.d_model = 64, .d_kv = 16, .num_heads = 4, .d_ff = 128, .num_layers = 4, .gated_gelu = true};
};

cli parse(int argc, char** argv) {
  if (argc < 2)
    throw smear::value_error("usage: smear-t5 compare|train|pretrain|tiny-data [options] (see `smear-t5 help`)");
  cli c;
  c.command = argv[1];
  const examples::arguments a{"smear-t5", argc, argv, 2, {"relu", "quick"}};
  c.data = a.text("data", (examples::data_root() / "t5").string());
  c.out = a.text("out", c.out);
  if (c.command == "tiny-data" && !a.positional().empty()) c.out = a.positional().back();
  c.backbone = a.text("backbone", "");
  if (c.backbone.empty()) c.backbone = c.data + "/backbone.safetensors";
  if (a.has("methods")) c.methods = a.list("methods", "");
  c.method = a.text("method", c.method);
  c.seeds = a.count("seeds", c.seeds);
  c.train.steps = a.count("steps", 600);
  c.train.batch = a.count("batch", c.train.batch);
  c.train.lr = a.real("lr", c.train.lr);
  c.train.bottleneck = a.count("bottleneck", c.train.bottleneck);
  c.train.eval_every = a.count("eval-every", c.train.eval_every);
  c.train.eval_limit = a.count("eval-limit", c.train.eval_limit);
  c.pretrain_steps = a.count("pretrain-steps", c.pretrain_steps);
  c.pretrain_lr = a.real("pretrain-lr", c.pretrain_lr);
  c.cfg.d_model = a.count("d-model", c.cfg.d_model);
  c.cfg.num_layers = a.count("layers", c.cfg.num_layers);
  c.cfg.num_heads = a.count("heads", c.cfg.num_heads);
  c.cfg.d_kv = a.count("d-kv", c.cfg.d_kv);
  c.cfg.d_ff = a.count("d-ff", c.cfg.d_ff);
  if (a.flag("relu")) c.cfg.gated_gelu = false;
  c.max_len = a.count("max-len", c.max_len);
  c.vocab = a.count("vocab", c.vocab);
  if (a.flag("quick")) {
    c.train.steps = std::min<std::size_t>(c.train.steps, 150);
    c.train.eval_every = 75;
    c.train.eval_limit = 500;
    c.pretrain_steps = std::min<std::size_t>(c.pretrain_steps, 250);
  }
  a.finish();
  if (c.seeds == 0 || c.train.steps == 0 || c.train.batch == 0 || c.train.eval_every == 0)
    throw a.error("--seeds, --steps, --batch and --eval-every must be positive");
  for (const auto& m : c.methods)
    if (!examples::known_method(m)) throw a.error("unknown method '" + m + "'; known: " + examples::method_list());
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

/// One routing block per panel: layer i's attention block, then its feed-forward block.
void write_heatmap(const std::string& path, const std::string& method, const std::vector<t5ex::task_info>& tasks,
                   const std::vector<std::vector<double>>& routing) {
  examples::heatmap h;
  h.title = method;
  h.subtitle = "mean routing probability on the test set: rows = tasks, columns = experts, one panel per routing block";
  for (const auto& t : tasks) h.rows.push_back(t.name);
  h.columns = t5ex::experts_per_block;
  for (std::size_t k = 0; k < routing.size(); ++k)
    h.panels.push_back({"layer " + std::to_string(k / 2) + (k % 2 ? " feed-forward" : " attention"), routing[k]});
  examples::write_heatmap(h, path);
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
        write_heatmap(c.out + "/routing_" + m + ".svg", m, d.tasks, r.test.routing);
    }
  std::vector<std::string> columns{"method"};
  for (const auto& t : d.tasks) columns.push_back(t.name);
  for (const char* col : {"average", "training time (s)", "inference (examples/s)", "trainable parameters"})
    columns.push_back(col);
  std::ostringstream md;
  md << examples::markdown_header(columns);
  for (const auto& m : c.methods) {
    const auto& rw = rows[m];
    std::vector<std::string> cells{m};
    for (std::size_t t = 0; t < d.tasks.size(); ++t) {
      std::vector<double> v;
      for (const auto& s : rw.per_task) v.push_back(s[t]);
      cells.push_back(examples::mean_std(v, 100, 1));
    }
    cells.push_back("**" + examples::mean_std(rw.average, 100, 1) + "**");
    cells.push_back(examples::mean_std(rw.train_s, 1, 0));
    cells.push_back(examples::mean_std(rw.infer, 1, 0));
    cells.push_back(std::to_string(rw.trainable));
    md << examples::markdown_row(cells);
  }
  std::ofstream(c.out + "/results.md") << md.str();
  std::printf("%s", md.str().c_str());
  std::fprintf(stderr, "wrote %s/results.md, %s/results.csv and %s/routing_*.svg\n", c.out.c_str(), c.out.c_str(),
               c.out.c_str());
  return 0;
}

#ifdef SMEAR_T5_MPI
/// MPI for the process's lifetime; aborts every process when one fails (a failed process
/// would leave the others waiting in a collective).
struct mpi_session {
  mpi_session(int& argc, char**& argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~mpi_session() { MPI_Finalize(); }
  static int size() { return smear::mpi::size(MPI_COMM_WORLD); }
  static void fail() {
    if (size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
  }
};
#else
struct mpi_session {
  mpi_session(int&, char**&) {}
  static int size() { return 1; }
  static void fail() {}
};
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::string(argv[1]) == "help" || std::string(argv[1]) == "--help")) {
    std::printf("%s", usage);
    return 0;
  }
  mpi_session mpi{argc, argv};
  try {
    cli c = parse(argc, argv);
    const auto ranks = static_cast<std::size_t>(mpi_session::size());
    if (ranks > 1) {
      if (c.command != "train")
        throw smear::value_error("smear-t5: under mpirun only `train` runs data-parallel; run " + c.command +
                                 " as one process");
      if (c.train.batch < ranks)
        throw smear::value_error(smear::detail::message("smear-t5: --batch ", c.train.batch, " is smaller than the ",
                                                        ranks, " processes"));
      if (!std::filesystem::exists(c.backbone))
        throw smear::value_error("smear-t5: no backbone at " + c.backbone + "; run `smear-t5 pretrain` first");
      const std::string threads = std::to_string(std::max<std::size_t>(1, std::size_t{std::thread::hardware_concurrency()} / ranks));
      setenv("SMEAR_NUM_THREADS", threads.c_str(), 0);  // before the pool's first use
    }
    if (c.command == "tiny-data") {
      std::filesystem::create_directories(c.out);
      t5ex::write_tiny_dataset(c.out, 3, 96, 5);
      std::printf("wrote a tiny generated data set to %s\n", c.out.c_str());
      return 0;
    }
    if (c.command != "compare" && c.command != "train" && c.command != "pretrain")
      throw smear::value_error("smear-t5: unknown command '" + c.command + "' (see `smear-t5 help`)");
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
#ifdef SMEAR_T5_MPI
      t5ex::data_parallel dp{MPI_COMM_WORLD};
      if (ranks > 1) {
        o.replicas = &dp;
        if (dp.rank() == 0) std::fprintf(stderr, "data-parallel over %zu processes: %zu examples of each batch of %zu apiece, "
                     "SMEAR_NUM_THREADS=%s\n", ranks, c.train.batch / ranks, c.train.batch, std::getenv("SMEAR_NUM_THREADS"));
      }
#endif
      const auto r = t5ex::train_classifier(enc, d, o, c.out + "/" + o.method + ".safetensors");
      if (o.replicas != nullptr && o.replicas->rank() != 0) return 0;
      for (std::size_t t = 0; t < d.tasks.size(); ++t)
        std::printf("%-20s %.4f\n", d.tasks[t].name.c_str(), r.test.accuracy[t]);
      std::printf("%-20s %.4f  (best validation %.4f at step %zu, %.1f s training, %.0f test examples/s)\n", "average",
                  r.test.average, r.best_validation, r.best_step, r.train_seconds, r.test.examples_per_s);
      return 0;
    }
    return compare(c, enc, d);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    mpi_session::fail();
    return 1;
  }
}
