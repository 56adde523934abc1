#pragma once
/// \file mpi.hpp
/// smear over MPI (the optional CMake component smear::mpi; the only header of the library that
/// includes <mpi.h>):
///
///   data_parallel      every process holds a copy of the model and a shard of each batch; the
///                      copies stay equal because their gradients are averaged after backward,
///                      in buckets (which may start reducing while the rest of backward runs);
///   tensor_parallel    (smear/mpi/tensor_parallel.hpp) each process holds one slice of every
///                      expert's parameters: experts too large for one process.
///
/// Data parallelism, for a model of several layers:
/// ```
/// smear::mpi::data_parallel<float> dp{MPI_COMM_WORLD};   // options: bucket size, overlap
/// for (auto* l : layers) l->set_replicas(&dp);        // sampled routing and batch statistics
/// dp.broadcast(all_parameters);                         // every copy starts from rank 0's
/// for (each step) {
///   dp.begin_batch(local_examples);                     // this process's share of the batch
///   forward ...; loss = mean over the local examples;
///   for (layers from last to first) { l->backward(...); dp.ready(l->parameters()); }
///   dp.finish();                                        // gradients: those of the global batch's mean loss
///   optimiser.step();
/// }
/// ```
/// After finish() every process holds the gradient of the global batch's mean loss (each
/// process's gradient weighted by its share of the batch, so shards may differ in size), and,
/// through set_replicas, every sampled routing decision and batch statistic is the one a
/// single process running the whole global batch would make (smear/replicas.hpp): k steps on
/// R processes give the parameters of k steps on one, up to the order of floating-point sums.
///
/// Parameters in device memory (the cuda layer's) are staged through host memory by the
/// context they live in: `dp.ready(block.parameters(), block.context())` (CUDA-aware MPI is
/// not used).

#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "smear/concepts.hpp"
#include "smear/error.hpp"
#include "smear/parameter.hpp"
#include "smear/replicas.hpp"

namespace smear::mpi {

/// The MPI datatype of T.
template <floating_point_value T>
MPI_Datatype datatype() noexcept {
  if constexpr (std::is_same_v<T, float>)
    return MPI_FLOAT;
  else
    return MPI_DOUBLE;
}

/// Throws io_error naming `what` and MPI's message when `rc` is not MPI_SUCCESS (the
/// communicator's error handler must be MPI_ERRORS_RETURN for MPI to return instead of abort).
inline void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  throw io_error(detail::message("smear::mpi: ", what, " failed: ", std::string_view(text, static_cast<std::size_t>(length))));
}

/// The rank of this process in `comm`, and the size of `comm`.
inline int rank(MPI_Comm comm) {
  int r = 0;
  check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank");
  return r;
}
inline int size(MPI_Comm comm) {
  int s = 0;
  check(MPI_Comm_size(comm, &s), "MPI_Comm_size");
  return s;
}

/// values ← their element-wise sum over `comm` (in place).
template <floating_point_value T>
void all_sum(MPI_Comm comm, std::span<T> values) {
  if (values.empty()) return;
  if (values.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()))
    throw value_error(detail::message("smear::mpi::all_sum: ", values.size(), " values, more than one MPI call takes"));
  check(MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), datatype<T>(), MPI_SUM, comm),
        "MPI_Allreduce");
}

/// How data_parallel reduces gradients.
struct data_parallel_options {
  /// Gradients travel in buckets of about this many bytes, one all-reduce each.
  std::size_t bucket_bytes = std::size_t{1} << 22;
  /// Start each bucket's reduction (MPI_Iallreduce) as soon as it fills, during the rest of
  /// backward, instead of one MPI_Allreduce per bucket in finish(). It pays where the MPI
  /// library moves non-blocking collectives on by itself (a progress thread, network offload);
  /// Open MPI 4.1 over shared memory does not, and its MPI_Iallreduce of 4 MB took 2.3× its
  /// MPI_Allreduce (bench/SCALING.md), so it is off by default.
  bool overlap = false;
};

/// Data-parallel training over an MPI communicator (see the file comment). One object per
/// model; every process calls its collective members (begin_batch, ready, finish, broadcast,
/// sum) in the same order with the same parameter lists.
template <floating_point_value T>
class data_parallel final : public replica_group<T> {
 public:
  explicit data_parallel(MPI_Comm comm = MPI_COMM_WORLD, data_parallel_options options = {})
      : comm_(comm), rank_(mpi::rank(comm)), size_(mpi::size(comm)), opt_(options),
        bucket_values_(std::clamp<std::size_t>(options.bucket_bytes / sizeof(T), 1, std::numeric_limits<int>::max())) {}
  data_parallel(const data_parallel&) = delete;
  data_parallel& operator=(const data_parallel&) = delete;
  /// Waits for reductions still in flight (their results are dropped).
  ~data_parallel() {
    for (auto& b : buckets_)
      if (b.request != MPI_REQUEST_NULL) MPI_Wait(&b.request, MPI_STATUS_IGNORE);
  }

  MPI_Comm communicator() const noexcept { return comm_; }
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

  /// Starts a step whose global batch is every process's `local` examples, in rank order.
  /// Collective. Throws value_error when the whole batch is empty or a step is still open.
  void begin_batch(std::size_t local) {
    if (open_ > 0) throw state_error("smear::mpi::data_parallel::begin_batch: the previous step's ready() gradients "
                                     "were not finish()ed");
    counts_.resize(static_cast<std::size_t>(size_));
    unsigned long long mine = local;
    check(MPI_Allgather(&mine, 1, MPI_UNSIGNED_LONG_LONG, counts_.data(), 1, MPI_UNSIGNED_LONG_LONG, comm_),
          "MPI_Allgather of the batch shares");
    first_ = total_ = 0;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) first_ = total_;
      total_ += static_cast<std::size_t>(counts_[static_cast<std::size_t>(r)]);
    }
    local_ = local;
    if (total_ == 0) throw value_error("smear::mpi::data_parallel::begin_batch: every process's batch is empty");
  }
  std::size_t first() const noexcept override { return first_; }
  std::size_t total() const noexcept override { return total_; }
  /// This process's examples in the current step.
  std::size_t local() const noexcept { return local_; }

  void sum(std::span<T> values) override { all_sum(comm_, values); }

  /// Every process's parameter values ← those of `root`. Collective.
  void broadcast(const parameter_list<T>& params, int root = 0) { broadcast_through(params, memory{}, root); }
  /// The same for a layer whose tensors live in a device context's memory (the cuda layer:
  /// `broadcast(block.parameters(), block.context())`): staged through host memory.
  template <class Context>
  void broadcast(const parameter_list<T>& params, const Context& context, int root = 0) {
    broadcast_through(params, memory::of(context), root);
  }

  /// The gradients of `params` are final for this step (their layer's backward is done):
  /// copies them, weighted by this process's share of the batch, into the open bucket, and
  /// with options().overlap starts reducing each bucket that fills, while the caller goes on
  /// with backward.
  /// Collective in the sense that every process must hand the same lists in the same order.
  void ready(const parameter_list<T>& params) { bucket_gradients(params, memory{}); }
  /// The same for a layer whose tensors live in a device context's memory (the cuda layer:
  /// `ready(block.parameters(), block.context())`): its on_device gradients are staged through
  /// host memory (the context's to_host into the bucket; finish() writes the sums back with
  /// to_device and waits for the context's stream). CUDA-aware MPI is not used.
  template <class Context>
  void ready(const parameter_list<T>& params, const Context& context) {
    bucket_gradients(params, memory::of(context));
  }

  /// Reduces the buckets not yet started, waits for the others and writes the sums back: each
  /// gradient handed to ready() is then Σ_r (B_r / B)·g_r, the same on every process.
  void finish() {
    for (std::size_t i = 0; i < open_; ++i) {
      bucket& b = buckets_[i];
      if (b.started)
        check(MPI_Wait(&b.request, MPI_STATUS_IGNORE), "MPI_Wait for a gradient bucket");
      else
        check(MPI_Allreduce(MPI_IN_PLACE, b.values.data(), static_cast<int>(b.used), datatype<T>(), MPI_SUM, comm_),
              "MPI_Allreduce of a gradient bucket");
      for (const auto& t : b.targets) t.where.write(t.grad.data(), b.values.data() + t.offset, t.grad.size());
      b.targets.clear();
      b.used = 0;
      b.started = false;
    }
    open_ = 0;
    for (const auto& m : to_synchronize_) m.synchronize();
    to_synchronize_.clear();
  }

  const data_parallel_options& options() const noexcept { return opt_; }
  /// Buckets this object has allocated (reused step after step).
  std::size_t buckets() const noexcept { return buckets_.size(); }

 private:
  /// How a tensor's memory is reached: directly (the host), or through a device context's
  /// copies.
  struct memory {
    const void* context = nullptr;
    void (*to_host)(const void*, T*, const T*, std::size_t) = nullptr;
    void (*to_device)(const void*, T*, const T*, std::size_t) = nullptr;
    void (*sync)(const void*) = nullptr;

    template <class Context>
    static memory of(const Context& c) {
      return {&c,
              [](const void* x, T* dst, const T* src, std::size_t n) {
                static_cast<const Context*>(x)->to_host(dst, src, n, "smear::mpi: staging a device tensor");
              },
              [](const void* x, T* dst, const T* src, std::size_t n) {
                static_cast<const Context*>(x)->to_device(dst, src, n, "smear::mpi: writing back a device tensor");
              },
              [](const void* x) { static_cast<const Context*>(x)->synchronize("smear::mpi: writing back"); }};
    }
    /// dst (host) ← n values of src (the tensor's memory).
    void read(T* dst, const T* src, std::size_t n) const {
      if (context != nullptr) to_host(context, dst, src, n);
      else std::copy_n(src, n, dst);
    }
    /// dst (the tensor's memory) ← n values of src (host).
    void write(T* dst, const T* src, std::size_t n) const {
      if (context != nullptr) to_device(context, dst, src, n);
      else std::copy_n(src, n, dst);
    }
    void synchronize() const {
      if (context != nullptr) sync(context);
    }
  };
  struct target {
    std::size_t offset;
    std::span<T> grad;
    memory where;
  };

  /// Throws value_error for a device tensor without a context to reach it through.
  static void require_reachable(const parameter<T>& p, const memory& m) {
    if (p.on_device && m.context == nullptr)
      throw value_error(detail::message("smear::mpi::data_parallel: parameter '", p.name, "' is in device memory; ",
                                        "pass the layer's context too: ready(block.parameters(), block.context())"));
  }

  void broadcast_through(const parameter_list<T>& params, const memory& m, int root) {
    for (const auto& p : params) {
      require_reachable(p, m);
      if (p.value.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()))
        throw value_error(detail::message("smear::mpi::data_parallel::broadcast: parameter '", p.name, "' has ",
                                          p.value.size(), " values, more than one MPI call takes"));
      const memory& where = p.on_device ? m : host_;
      staging_.resize(p.value.size());
      T* data = p.on_device ? staging_.data() : p.value.data();
      if (p.on_device) where.read(data, p.value.data(), p.value.size());
      check(MPI_Bcast(data, static_cast<int>(p.value.size()), datatype<T>(), root, comm_), "MPI_Bcast");
      if (p.on_device) {
        where.write(p.value.data(), data, p.value.size());
        where.synchronize();
      }
    }
  }

  void bucket_gradients(const parameter_list<T>& params, const memory& m) {
    if (total_ == 0) throw state_error("smear::mpi::data_parallel::ready: call begin_batch() first");
    const T weight = static_cast<T>(local_) / static_cast<T>(total_);
    for (const auto& p : params) {
      require_reachable(p, m);
      const memory& where = p.on_device ? m : host_;
      if (p.on_device && std::ranges::find(to_synchronize_, m.context, &memory::context) == to_synchronize_.end())
        to_synchronize_.push_back(m);
      std::span<T> g = p.grad;
      while (!g.empty()) {
        bucket& b = open_bucket();
        const std::size_t n = std::min(g.size(), bucket_values_ - b.used);
        T* into = b.values.data() + b.used;
        where.read(into, g.data(), n);
        for (std::size_t i = 0; i < n; ++i) into[i] *= weight;
        b.targets.push_back({b.used, g.first(n), where});
        b.used += n;
        g = g.subspan(n);
        if (b.used == bucket_values_ && opt_.overlap) start(b);
      }
    }
    progress();
  }
  struct bucket {
    std::vector<T> values;
    std::vector<target> targets;
    std::size_t used = 0;
    bool started = false;
    MPI_Request request = MPI_REQUEST_NULL;
  };

  /// The bucket gradients go into now: the last open one unless it is full.
  bucket& open_bucket() {
    if (open_ == 0 || buckets_[open_ - 1].used == bucket_values_) {
      if (open_ == buckets_.size()) buckets_.emplace_back().values.resize(bucket_values_);
      ++open_;
    }
    return buckets_[open_ - 1];
  }
  void start(bucket& b) {
    check(MPI_Iallreduce(MPI_IN_PLACE, b.values.data(), static_cast<int>(b.used), datatype<T>(), MPI_SUM, comm_,
                         &b.request),
          "MPI_Iallreduce of a gradient bucket");
    b.started = true;
  }
  /// Lets MPI move the started reductions on (without an asynchronous progress thread, MPI
  /// advances non-blocking collectives only inside MPI calls).
  void progress() {
    for (std::size_t i = 0; i < open_; ++i)
      if (buckets_[i].started && buckets_[i].request != MPI_REQUEST_NULL) {
        int done = 0;
        check(MPI_Test(&buckets_[i].request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      }
  }

  MPI_Comm comm_;
  int rank_, size_;
  data_parallel_options opt_;
  std::size_t bucket_values_;
  std::vector<unsigned long long> counts_;
  std::size_t first_ = 0, total_ = 0, local_ = 0;
  std::vector<bucket> buckets_;
  std::size_t open_ = 0;  ///< buckets_[0, open_) hold this step's gradients
  memory host_{};
  std::vector<memory> to_synchronize_;  ///< the device contexts finish() wrote back through
  std::vector<T> staging_;              ///< broadcast's host copy of a device tensor
};

}  // namespace smear::mpi
