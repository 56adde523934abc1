#pragma once
/// \file replicas.hpp
/// What a layer needs to know when copies of it on several processes (data-parallel replicas)
/// share each batch: which examples of the global batch this process holds, and a sum over
/// the replicas for the few statistics the strategies take over a whole batch. The library
/// itself has no communication: smear/mpi.hpp implements this over an MPI communicator
/// (smear::mpi::data_parallel); a test may implement it in one process.
///
/// With a replica group set (layer_core::set_replicas), a forward in training mode and its
/// backward behave as one process running the whole global batch would, for the examples this
/// process holds:
/// - every sampled decision (expert dropout, Gumbel noise, REINFORCE's, AdaMix's, random
///   routing's and the skills' draws) is the one the whole batch's run draws for the example:
///   the layer skips the other replicas' draws, so all replicas' generators stay in step;
/// - batch statistics are summed over the replicas: REINFORCE's moving-average baseline moves
///   by the global batch's mean loss, cluster routing's centres by the global members' means.
/// What stays per process: gradients (smear::mpi::data_parallel averages them, weighting each process by its share of the
/// batch), the
/// auxiliary loss and the routing of the last forward (of this process's examples). In
/// evaluation mode a layer ignores its group and runs alone.

#include <cstddef>
#include <span>

namespace smear {

/// The processes holding copies of a layer, and how the current global batch is split.
template <class T>
class replica_group {
 public:
  virtual ~replica_group() = default;
  /// This process holds examples [first(), first() + B) of the current global batch.
  virtual std::size_t first() const noexcept = 0;
  /// The global batch's examples, summed over the replicas.
  virtual std::size_t total() const noexcept = 0;
  /// values ← their element-wise sum over the replicas. Collective: every replica calls it,
  /// with the same length, in the same order.
  virtual void sum(std::span<T> values) = 0;
};

namespace detail {

/// Sums `values` over `group`'s replicas; nothing without a group.
template <class T>
void sum_over_replicas(replica_group<T>* group, std::span<T> values) {
  if (group != nullptr) group->sum(values);
}

}  // namespace detail
}  // namespace smear
