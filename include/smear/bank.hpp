#pragma once
/// \file bank.hpp
/// N experts of one type stored as the rows of one contiguous N×P matrix, with a gradient
/// matrix of the same shape. Merging is then one GEMM over the whole batch.

#include <algorithm>
#include <cstddef>
#include <span>
#include <vector>

#include "smear/concepts.hpp"
#include "smear/error.hpp"
#include "smear/layout.hpp"
#include "smear/random.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// The parameters (and their gradients) of N experts sharing one architecture.
///
/// Example: `smear::expert_bank<smear::adapter<float>, 8> bank{smear::adapter<float>{768, 24}};`
template <class Expert, std::size_t N>
  requires mergeable_expert<Expert>
class expert_bank {
  static_assert(N >= 1, "smear::expert_bank: the number of experts N must be at least 1");

 public:
  using expert_type = Expert;
  using value_type = typename Expert::value_type;
  static constexpr std::size_t experts = N;

  /// Zero-filled bank of N copies of `prototype`'s architecture. Throws value_error when the
  /// expert's layout does not tile its parameter vector.
  explicit expert_bank(Expert prototype)
      : proto_(std::move(prototype)),
        layout_(proto_.layout()),
        p_(proto_.parameter_count()),
        values_(detail::checked_elements("expert_bank", "the bank [N, P] =", sizeof(value_type), N, p_)),
        grads_(N * p_) {
    std::size_t next = 0;
    for (const auto& s : layout_) {
      if (s.offset != next)
        throw value_error(detail::message("expert_bank: layout slot '", s.name, "' starts at ",
                                          s.offset, ", expected ", next, " (slots must tile [0, P))"));
      next += s.size();
    }
    if (next != p_)
      throw value_error(detail::message("expert_bank: the layout covers ", next,
                                        " parameters but parameter_count() is ", p_));
  }

  const Expert& expert() const noexcept { return proto_; }
  const parameter_layout& layout() const noexcept { return layout_; }
  std::size_t parameter_count() const noexcept { return p_; }

  /// All parameters, row e = expert e: [N, P].
  matrix_ref<value_type> values() noexcept { return {values_.data(), N, p_}; }
  matrix_ref<const value_type> values() const noexcept { return {values_.data(), N, p_}; }
  /// Their gradients: [N, P].
  matrix_ref<value_type> gradients() noexcept { return {grads_.data(), N, p_}; }
  matrix_ref<const value_type> gradients() const noexcept { return {grads_.data(), N, p_}; }

  /// Expert e's parameter vector.
  std::span<value_type> operator[](std::size_t e) noexcept { return values().row(e); }
  std::span<const value_type> operator[](std::size_t e) const noexcept { return values().row(e); }

  /// One named tensor of expert e (e.g. "down.weight").
  std::span<value_type> tensor(std::size_t e, std::string_view name) {
    const auto& s = find_slot(layout_, name);
    return (*this)[e].subspan(s.offset, s.size());
  }
  std::span<const value_type> tensor(std::size_t e, std::string_view name) const {
    const auto& s = find_slot(layout_, name);
    return (*this)[e].subspan(s.offset, s.size());
  }

  /// Draws every expert's parameters from `gen` following the layout's rules, expert by expert.
  void initialize(rng& gen) {
    for (std::size_t e = 0; e < N; ++e) smear::initialize(layout_, (*this)[e], gen);
  }

  void zero_grad() noexcept { std::fill(grads_.begin(), grads_.end(), value_type(0)); }

 private:
  Expert proto_;
  parameter_layout layout_;
  std::size_t p_;
  std::vector<value_type> values_;
  std::vector<value_type> grads_;
};

}  // namespace smear
