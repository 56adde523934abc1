#pragma once
/// \file mpi/tensor_parallel.hpp
/// Tensor-parallel routing blocks over MPI, for experts too large for one process (part of
/// smear::mpi). Each of the R processes holds the same slice of every expert's parameter
/// axis (for an adapter, as Megatron splits an MLP: a column block of the down-projection and
/// the matching rows of the up-projection) and a replica of the router, whose input is the
/// full pooled vector. A forward routes (the same p on every process), merges its slices
/// locally with those shared probabilities (no communication for the merge), applies them,
/// and one all-reduce of the block output completes it; backward mirrors it with one
/// all-reduce of ∂ℓ/∂x and one of the router's (small) gradients. Every process passes the
/// same x and dy and gets the same y and dx.
///
/// How an expert type splits is said by a specialisation of tensor_split (adapter's is
/// below): the expert of one part, and for each tensor of its layout along which axis it
/// splits (or that part 0 alone holds it, as the up-projection's bias).

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "smear/experts/adapter.hpp"
#include "smear/layer.hpp"
#include "smear/mpi.hpp"

namespace smear::mpi {

/// How one tensor of an expert's layout is split over the parts.
struct split_rule {
  std::string slot;  ///< the tensor's name in the layout
  int axis;          ///< the axis split into R contiguous blocks (0 or 1), or first_part_only
  static constexpr int first_part_only = -1;  ///< part 0 holds the whole tensor, the others none
};

/// Part r of R of the range [0, n): [n·r / R, n·(r + 1) / R).
inline std::size_t part_begin(std::size_t n, std::size_t r, std::size_t parts) noexcept { return n * r / parts; }

/// The customisation point: specialise it for an expert type that splits.
template <class Expert>
struct tensor_split;

/// An adapter d → m → d splits its bottleneck m: part r has m_r = |[m·r/R, m·(r+1)/R)|
/// bottleneck units; down.weight [d, m] by columns, down.bias [m] and up.weight [m, d] by rows;
/// up.bias [d] (when enabled) is part 0's. The parts' outputs sum to the full adapter's.
template <class T>
struct tensor_split<adapter<T>> {
  static std::size_t units(const adapter<T>& full) noexcept { return full.bottleneck(); }
  static adapter<T> part(const adapter<T>& full, std::size_t r, std::size_t parts) {
    adapter_options o = full.options();
    o.up_bias = o.up_bias && r == 0;
    const std::size_t m = full.bottleneck();
    return adapter<T>{full.input_dim(), part_begin(m, r + 1, parts) - part_begin(m, r, parts), o};
  }
  static std::vector<split_rule> rules() {
    return {{"down.weight", 1}, {"down.bias", 0}, {"up.weight", 0}, {"up.bias", split_rule::first_part_only}};
  }
};

template <class Expert>
concept splittable_expert = mergeable_expert<Expert> && requires(const Expert& e, std::size_t r) {
  { tensor_split<Expert>::units(e) } -> std::convertible_to<std::size_t>;
  { tensor_split<Expert>::part(e, r, r) } -> std::same_as<Expert>;
  { tensor_split<Expert>::rules() } -> std::same_as<std::vector<split_rule>>;
};

namespace detail {

/// For part r of R of the slot `rule` names: fn(full offset, part offset, length) for each
/// contiguous block the part shares with the full parameter vector.
template <class Fn>
void for_each_block(const parameter_slot& full, const parameter_layout& part_layout, const split_rule& rule,
                    std::size_t r, std::size_t parts, Fn&& fn) {
  if (rule.axis == split_rule::first_part_only) {
    if (r == 0) fn(full.offset, find_slot(part_layout, rule.slot).offset, full.size());
    return;
  }
  const parameter_slot& p = find_slot(part_layout, rule.slot);
  const auto axis = static_cast<std::size_t>(rule.axis);
  const std::size_t n = full.shape[axis], lo = part_begin(n, r, parts), hi = part_begin(n, r + 1, parts);
  if (axis == 0) {  // rows [lo, hi): one block
    const std::size_t row = full.size() / n;
    fn(full.offset + lo * row, p.offset, (hi - lo) * row);
    return;
  }
  const std::size_t rows = full.shape[0], cols = full.shape[1];  // columns [lo, hi) of each row
  for (std::size_t i = 0; i < rows; ++i) fn(full.offset + i * cols + lo, p.offset + i * (hi - lo), hi - lo);
}

}  // namespace detail

/// A routing block of N experts of type `Expert` whose parameters are split over the
/// processes of `comm` (see the file comment); strategies smear and ensemble.
///
/// Example:
/// ```
/// smear::layer<smear::adapter<float>, 8> full{smear::adapter<float>{4096, 14336}, options, seed};
/// smear::mpi::tensor_parallel<smear::adapter<float>, 8> block{full.expert(), options, seed, MPI_COMM_WORLD};
/// block.scatter(full);          // take this process's slice (or train from block's own start)
/// block.forward(x, y);  block.backward(dy, dx);  // the same x, dy on every process
/// block.gather(full);  if (rank == 0) smear::save("block.safetensors", full);   // a full checkpoint
/// ```
template <class Expert, std::size_t N, class Backend = default_backend>
  requires splittable_expert<Expert>
class tensor_parallel {
 public:
  using T = typename Expert::value_type;
  using value_type = T;
  using full_layer = layer<Expert, N, Backend>;

  /// This process's part of a block shaped like `full_expert`: its slice of the experts
  /// (initialised from `seed` as a part, so the numbers differ from a full layer's; scatter()
  /// a full layer for those) and a replica of the router (the same on every process for a
  /// seed). Throws value_error for a strategy other than smear and ensemble, or fewer units to
  /// split than processes.
  tensor_parallel(const Expert& full_expert, layer_options options, std::uint64_t seed, MPI_Comm comm)
      : comm_(comm), rank_(static_cast<std::size_t>(mpi::rank(comm))), parts_(static_cast<std::size_t>(mpi::size(comm))),
        full_(full_expert), residual_(options.residual.value_or(is_residual_expert<Expert>)),
        local_(split(full_expert, options, rank_, parts_), without_residual(options), seed) {
    full_layout_ = full_.layout();
    router_step_.resize(local_.router().gradients().size());
  }

  std::size_t rank() const noexcept { return rank_; }
  std::size_t parts() const noexcept { return parts_; }
  /// This process's layer: the experts' slice and the router (its residual is added here).
  full_layer& local() noexcept { return local_; }
  const full_layer& local() const noexcept { return local_; }
  const Expert& full_expert() const noexcept { return full_; }

  /// This process's trainable tensors: its slice of the experts and the router (whose
  /// gradients backward() makes the same on every process, so identical optimiser steps keep
  /// the replicas equal).
  parameter_list<T> parameters() { return local_.parameters(); }
  void zero_grad() noexcept { local_.zero_grad(); }
  void train(bool on = true) noexcept { local_.train(on); }
  matrix_ref<const T> routing() const noexcept { return local_.routing(); }

  /// y ← block(x), the same x on every process; the same y on every process. Collective.
  void forward(tokens<const T> x, std::span<T> y, route_inputs in = {}) {
    local_.forward(x, y, in);  // this slice's share of each expert's output
    last_ = x;
    all_sum(comm_, y);
    if (residual_) add_valid_rows(x, std::span<const T>(x.data, x.size()), y);
  }

  /// dx ← ∂ℓ/∂x given the same dy on every process; adds this slice's expert gradients and
  /// the router's (summed over the processes) into their buffers. Collective.
  void backward(std::span<const T> dy, std::span<T> dx) {
    auto g = local_.router().gradients();
    std::copy(g.begin(), g.end(), router_step_.begin());
    local_.backward(dy, dx);  // the slice's ∂ℓ/∂x and its share of ∂ℓ/∂p, through the router
    for (std::size_t i = 0; i < g.size(); ++i) g[i] -= router_step_[i];  // this step's share
    all_sum(comm_, g);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] += router_step_[i];
    all_sum(comm_, dx);
    if (residual_) add_valid_rows(last_, dy, dx);
  }

  /// Every process's slice ← its part of `full`'s experts; the router, the training steps and
  /// the mode ← `full`'s. Not collective (each process reads `full` alone).
  void scatter(const full_layer& full) {
    check_shape(full, "smear::mpi::tensor_parallel::scatter");
    auto& bank = local_.bank();
    const auto part_layout = bank.layout();
    for (std::size_t e = 0; e < N; ++e) {
      const auto src = full.bank()[e];
      const auto dst = bank[e];
      for (const auto& rule : rules())
        for_slot(rule, rank_, part_layout,
                 [&](std::size_t f, std::size_t p, std::size_t n) { std::copy_n(src.data() + f, n, dst.data() + p); });
    }
    const auto r = full.router().values();
    std::copy(r.begin(), r.end(), local_.router().values().begin());
    local_.set_training_steps(full.training_steps());
    local_.train(full.training());
  }

  /// `full`'s experts ← every process's slice, its router, training steps and mode ← this
  /// process's. Collective (an all-gather of the slices); every process gets the full layer.
  void gather(full_layer& full) const {
    check_shape(full, "smear::mpi::tensor_parallel::gather");
    const auto& bank = local_.bank();
    const std::size_t mine = N * bank.parameter_count();
    if (mine > static_cast<std::size_t>(std::numeric_limits<int>::max()))
      throw value_error(smear::detail::message("smear::mpi::tensor_parallel::gather: a slice of ", mine,
                                               " values, more than one MPI call takes"));
    std::vector<int> counts(parts_), offsets(parts_);
    int count = static_cast<int>(mine);
    check(MPI_Allgather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, comm_), "MPI_Allgather of the slice sizes");
    std::size_t all = 0;
    for (std::size_t r = 0; r < parts_; ++r) offsets[r] = static_cast<int>(all), all += static_cast<std::size_t>(counts[r]);
    std::vector<T> slices(all);
    check(MPI_Allgatherv(bank.values().data, count, datatype<T>(), slices.data(), counts.data(), offsets.data(),
                         datatype<T>(), comm_),
          "MPI_Allgatherv of the expert slices");
    auto& out = full.bank();
    for (std::size_t r = 0; r < parts_; ++r) {
      const auto part_layout = split(full_, local_.options(), r, parts_).layout();
      const std::size_t P = static_cast<std::size_t>(counts[r]) / N;
      for (std::size_t e = 0; e < N; ++e) {
        const T* src = slices.data() + static_cast<std::size_t>(offsets[r]) + e * P;
        const auto dst = out[e];
        for (const auto& rule : rules())
          for_slot(rule, r, part_layout,
                   [&](std::size_t f, std::size_t p, std::size_t n) { std::copy_n(src + p, n, dst.data() + f); });
      }
    }
    const auto rv = local_.router().values();
    std::copy(rv.begin(), rv.end(), full.router().values().begin());
    full.set_training_steps(local_.training_steps());
    full.train(local_.training());
  }

 private:
  static std::vector<split_rule> rules() { return tensor_split<Expert>::rules(); }

  /// Throws shape_error unless `full`'s experts have the layout of the expert this block splits.
  void check_shape(const full_layer& full, const char* op) const {
    const auto& layout = full.bank().layout();
    const bool same = layout.size() == full_layout_.size() &&
                      std::ranges::equal(layout, full_layout_, [](const parameter_slot& a, const parameter_slot& b) {
                        return a.name == b.name && a.shape == b.shape;
                      });
    if (!same)
      throw shape_error(smear::detail::message(op, ": the full layer's experts (", layout.size(), " tensors, P = ",
                                               full.bank().parameter_count(), ") are not the expert this block splits (",
                                               full_layout_.size(), " tensors, P = ", full_.parameter_count(), ")"));
  }

  static Expert split(const Expert& full, const layer_options& o, std::size_t r, std::size_t parts) {
    const auto s = o.routing.strategy;
    if (s != strategy::smear && s != strategy::ensemble)
      throw value_error(smear::detail::message("smear::mpi::tensor_parallel: strategy ", to_string(s), " is not split (",
                                        "smear and ensemble are: their router's gradient sums over the slices)"));
    if (tensor_split<Expert>::units(full) < parts)
      throw value_error(smear::detail::message("smear::mpi::tensor_parallel: ", tensor_split<Expert>::units(full),
                                        " units to split over ", parts, " processes"));
    return tensor_split<Expert>::part(full, r, parts);
  }
  static layer_options without_residual(layer_options o) {
    o.residual = false;  // added once, after the sum
    return o;
  }

  /// fn(full offset, part offset, length) for each block of `rule`'s slot that part r holds.
  template <class Fn>
  void for_slot(const split_rule& rule, std::size_t r, const parameter_layout& part_layout, Fn&& fn) const {
    const auto it = std::ranges::find(full_layout_, rule.slot, &parameter_slot::name);
    if (it == full_layout_.end()) return;  // an optional tensor this expert does not have
    detail::for_each_block(*it, part_layout, rule, r, parts_, fn);
  }

  /// out += in on the valid rows of x's examples (the residual).
  void add_valid_rows(tokens<const T> x, std::span<const T> in, std::span<T> out) const {
    const std::size_t d = x.dim;
    for (std::size_t b = 0; b < x.batch; ++b)
      for (std::size_t i = b * x.length * d; i < (b * x.length + x.valid(b)) * d; ++i) out[i] += in[i];
  }

  MPI_Comm comm_;
  std::size_t rank_, parts_;
  Expert full_;
  parameter_layout full_layout_;
  bool residual_;
  full_layer local_;
  std::vector<T> router_step_;  ///< the router's gradients before this backward
  tokens<const T> last_{};      ///< the last forward's input
};

}  // namespace smear::mpi
