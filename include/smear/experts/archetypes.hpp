#pragma once
/// \file experts/archetypes.hpp
/// Types that meet exactly one expert concept each and offer nothing more. Every algorithm in
/// smear is instantiated with them in the tests, so no code relies on more than its concept
/// promises. They also serve as the smallest example of a user's own expert.

#include <cstddef>
#include <span>

#include "smear/backend/tags.hpp"
#include "smear/layout.hpp"
#include "smear/tensor.hpp"

namespace smear::archetypes {

/// Meets `expert`: y = x ⊙ w, row by row (P = dim).
template <class T>
class forward_expert {
 public:
  using value_type = T;
  explicit forward_expert(std::size_t dim) : dim_(dim) {}
  std::size_t input_dim() const { return dim_; }
  std::size_t output_dim() const { return dim_; }
  std::size_t parameter_count() const { return dim_; }
  std::size_t saved_size(std::size_t) const { return 0; }
  void forward(backend::reference, std::span<const T> w, matrix_ref<const T> x, matrix_ref<T> y,
               std::span<T>) const {
    for (std::size_t i = 0; i < x.rows; ++i)
      for (std::size_t j = 0; j < dim_; ++j) y(i, j) = x(i, j) * w[j];
  }

 protected:
  std::size_t dim_;
};

/// Meets `differentiable_expert`: forward_expert plus its backward.
template <class T>
class differentiable_expert : public forward_expert<T> {
 public:
  using forward_expert<T>::forward_expert;
  std::size_t scratch_size(std::size_t) const { return 0; }
  void backward(backend::reference, std::span<const T> w, matrix_ref<const T> x,
                std::span<const T>, matrix_ref<const T> dy, matrix_ref<T> dx, std::span<T> dw,
                std::span<T>) const {
    for (std::size_t j = 0; j < this->dim_; ++j) dw[j] = T(0);
    for (std::size_t i = 0; i < x.rows; ++i)
      for (std::size_t j = 0; j < this->dim_; ++j) {
        dx(i, j) = dy(i, j) * w[j];
        dw[j] += dy(i, j) * x(i, j);
      }
  }
};

/// Meets `mergeable_expert`: differentiable_expert plus a layout (one tensor `scale`).
template <class T>
class mergeable_expert : public differentiable_expert<T> {
 public:
  using differentiable_expert<T>::differentiable_expert;
  parameter_layout layout() const {
    return layout_builder{}.add("scale", {this->dim_}, init_rule::normal(1.0)).build();
  }
};

}  // namespace smear::archetypes
