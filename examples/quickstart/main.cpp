// Quickstart: a SMEAR block of adapter experts learns a multi-task problem in which every task
// needs a different expert, and its router learns which expert serves which task.
//
// Each task t has a hidden "teacher" adapter and shifts its inputs by its own direction, so the
// router can tell the tasks apart from an example's mean token. The block is trained with AdamW
// to reproduce y = x + teacher_t(x); a single adapter (N = 1) trained the same way shows what
// routing buys. At the end the router's average distribution per task shows which experts
// specialised.
//
// Usage: quickstart [epochs] [seed] [strategy]
// strategy: smear (default), ensemble, st_gumbel, reinforce, dselect, tag, hash, adamix,
// latent_skills — the same block under another routing strategy.

#include <smear/smear.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr std::size_t tasks = 4, dim = 16, bottleneck = 8, max_len = 12, batch = 32;
constexpr std::size_t steps_per_epoch = 25;

struct dataset {
  std::vector<float> x, target;
  std::vector<std::int32_t> lengths;
  std::vector<std::int32_t> task;
};

/// Draws one batch: random tasks, random lengths, x = noise + task direction,
/// target = x + teacher_t(x) on valid tokens.
dataset draw(smear::rng& gen, const smear::adapter<float>& shape,
             const std::vector<std::vector<float>>& teachers,
             const std::vector<std::vector<float>>& directions) {
  dataset d;
  d.x.assign(batch * max_len * dim, 0.0f);
  d.target.assign(d.x.size(), 0.0f);
  d.lengths.resize(batch);
  d.task.resize(batch);
  std::vector<float> saved(shape.saved_size(max_len));
  for (std::size_t b = 0; b < batch; ++b) {
    const auto t = static_cast<std::size_t>(gen.below(tasks));
    const auto len = static_cast<std::size_t>(4 + gen.below(max_len - 3));
    d.task[b] = static_cast<std::int32_t>(t);
    d.lengths[b] = static_cast<std::int32_t>(len);
    float* xb = d.x.data() + b * max_len * dim;
    for (std::size_t i = 0; i < len * dim; ++i)
      xb[i] = static_cast<float>(gen.normal()) + directions[t][i % dim];
    float* yb = d.target.data() + b * max_len * dim;
    shape.forward(smear::backend::cpu{}, std::span<const float>(teachers[t]),
                  smear::matrix_ref<const float>{xb, len, dim}, smear::matrix_ref<float>{yb, len, dim},
                  std::span<float>(saved));
    for (std::size_t i = 0; i < len * dim; ++i) yb[i] += xb[i];
  }
  return d;
}

/// Mean squared error over valid tokens; writes dℓ/dy and each example's own mean squared
/// error (what REINFORCE's estimator needs).
float mse(const dataset& d, const std::vector<float>& y, std::vector<float>& dy,
          std::vector<float>& example_loss) {
  std::size_t count = 0;
  for (auto l : d.lengths) count += static_cast<std::size_t>(l) * dim;
  double loss = 0;
  std::fill(dy.begin(), dy.end(), 0.0f);
  for (std::size_t b = 0; b < batch; ++b) {
    const std::size_t n = static_cast<std::size_t>(d.lengths[b]) * dim;
    double own = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t k = b * max_len * dim + i;
      const float r = y[k] - d.target[k];
      own += double(r) * r;
      dy[k] = 2.0f * r / static_cast<float>(count);
    }
    loss += own;
    example_loss[b] = static_cast<float>(own / static_cast<double>(n));
  }
  return static_cast<float>(loss / static_cast<double>(count));
}

/// Trains `block` for `epochs`, printing progress; returns the final evaluation loss.
template <class Layer>
float train(Layer& block, const char* name, std::size_t epochs, std::uint64_t seed,
            const smear::adapter<float>& shape, const std::vector<std::vector<float>>& teachers,
            const std::vector<std::vector<float>>& directions) {
  smear::adamw<float> opt{block.parameters(), {.lr = 1e-2, .weight_decay = 0.0}};
  smear::rng gen{seed};
  std::vector<float> y(batch * max_len * dim), dy(y.size()), dx(y.size()), losses(batch);
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t epoch = 1; epoch <= epochs; ++epoch) {
    double total = 0;
    for (std::size_t s = 0; s < steps_per_epoch; ++s) {
      const auto d = draw(gen, shape, teachers, directions);
      block.forward(smear::make_tokens<const float>(d.x.data(), batch, max_len, dim, d.lengths), y,
                    {.tags = d.task});
      total += mse(d, y, dy, losses);
      opt.zero_grad();
      block.backward(dy, dx, losses);
      opt.step();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%-7s epoch %3zu/%zu  loss %.4f  %5.2f s  ETA %5.2f s\n", name, epoch, epochs,
                total / steps_per_epoch, secs,
                secs / static_cast<double>(epoch) * static_cast<double>(epochs - epoch));
    std::fflush(stdout);
  }
  // evaluation on fresh batches, no dropout
  block.train(false);
  smear::rng eval{seed + 1000};
  double loss = 0;
  for (int i = 0; i < 20; ++i) {
    const auto d = draw(eval, shape, teachers, directions);
    block.forward(smear::make_tokens<const float>(d.x.data(), batch, max_len, dim, d.lengths), y,
                  {.tags = d.task});
    loss += mse(d, y, dy, losses);
  }
  return static_cast<float>(loss / 20);
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t epochs = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 30;
  const std::uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  smear::strategy_options routing;
  try {
    if (argc > 3) routing = smear::parse_strategy(argv[3]);
  } catch (const smear::value_error& e) {
    std::fprintf(stderr, "quickstart: %s\n", e.what());
    return 2;
  }
  routing.tasks = tasks;  // for latent skills

  // the problem: one teacher adapter and one input direction per task
  const smear::adapter<float> shape{dim, bottleneck};
  smear::rng gen{seed};
  std::vector<std::vector<float>> teachers(tasks), directions(tasks);
  for (std::size_t t = 0; t < tasks; ++t) {
    teachers[t].resize(shape.parameter_count());
    for (auto& v : teachers[t]) v = static_cast<float>(0.5 * gen.normal());
    directions[t].resize(dim);
    for (auto& v : directions[t]) v = static_cast<float>(1.5 * gen.normal());
  }

  std::printf("smear %d.%d.%d quickstart: %zu tasks, d = %zu, m = %zu, up to %zu tokens, batch %zu\n\n",
              SMEAR_VERSION_MAJOR, SMEAR_VERSION_MINOR, SMEAR_VERSION_PATCH, tasks, dim, bottleneck,
              max_len, batch);

  // a block of 4 adapter experts with the official defaults (LayerNorm router, SiLU adapters)
  // and the expert dropout the official SMEAR runs use
  smear::layer<smear::adapter<float>, tasks> block{
      shape, {.router = {.expert_dropout = 0.1}, .routing = routing}, seed};
  const std::string name{argc > 3 ? argv[3] : "smear"};
  const float smear_loss = train(block, name.c_str(), epochs, seed, shape, teachers, directions);

  // the same budget for one adapter
  smear::layer<smear::adapter<float>, 1> single{shape, {}, seed};
  const float single_loss = train(single, "single", epochs, seed, shape, teachers, directions);

  std::printf("\nheld-out loss: %s (N = %zu) %.4f, single adapter %.4f\n\n", name.c_str(), tasks,
              smear_loss, single_loss);

  // the router's average distribution per task
  std::vector<double> sum(tasks * tasks, 0.0);
  std::vector<int> count(tasks, 0);
  smear::rng eval{seed + 2000};
  std::vector<float> y(batch * max_len * dim);
  for (int i = 0; i < 20; ++i) {
    const auto d = draw(eval, shape, teachers, directions);
    block.forward(smear::make_tokens<const float>(d.x.data(), batch, max_len, dim, d.lengths), y,
                  {.tags = d.task});
    for (std::size_t b = 0; b < batch; ++b) {
      const auto t = static_cast<std::size_t>(d.task[b]);
      ++count[t];
      for (std::size_t e = 0; e < tasks; ++e) sum[t * tasks + e] += block.routing()(b, e);
    }
  }
  std::printf("average routing distribution (rows: tasks, columns: experts)\n        ");
  for (std::size_t e = 0; e < tasks; ++e) std::printf("  expert %zu", e);
  std::printf("\n");
  for (std::size_t t = 0; t < tasks; ++t) {
    std::printf("task %zu  ", t);
    for (std::size_t e = 0; e < tasks; ++e) std::printf("  %8.3f", sum[t * tasks + e] / count[t]);
    std::printf("\n");
  }
  return 0;
}
