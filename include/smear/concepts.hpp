#pragma once
/// \file concepts.hpp
/// Every requirement smear places on a user's type, in one place.
///
/// An expert is a *view*: it knows its dimensions and how its parameters are laid out in a
/// flat vector of length P, and it runs on any such vector — one expert's row of the bank or
/// a merged row. It holds no trainable state of its own. The three concepts grow from the
/// minimum to what a SMEAR layer needs:
///
///   expert                 forward over rows of tokens with a parameter vector;
///   differentiable_expert  also backward (input and parameter gradients);
///   mergeable_expert       also a named parameter layout, so banks can be initialised,
///                          saved, loaded and merged as weighted sums of parameter vectors.
///
/// The archetypes in smear/experts/archetypes.hpp meet each concept and nothing more.

#include <concepts>
#include <cstddef>
#include <span>

#include "smear/backend/tags.hpp"
#include "smear/layout.hpp"
#include "smear/tensor.hpp"

namespace smear {

/// The element types smear computes in.
template <class T>
concept floating_point_value = std::same_as<T, float> || std::same_as<T, double>;

/// An expert runs forward over a block of token rows with a flat parameter vector.
///
/// Requires, for `const E e`, `T = E::value_type`:
/// - `e.input_dim()`, `e.output_dim()`, `e.parameter_count()`: sizes, as std::size_t;
/// - `e.saved_size(rows)`: how many T the forward pass saves for backward for `rows` rows;
/// - `e.forward(backend::reference{}, params, x, y, saved)` with `params` a span of
///   parameter_count() values, `x` a [rows, input_dim] matrix_ref<const T>, `y` a
///   [rows, output_dim] matrix_ref<T> that forward overwrites, `saved` a span of
///   saved_size(rows) values. A forward templated on the backend tag gets the cpu tag too;
///   one written for `reference` only serves every host backend (cpu derives from it).
template <class E>
concept expert =
    floating_point_value<typename E::value_type> &&
    requires(const E& e, std::size_t rows, std::span<const typename E::value_type> params,
             matrix_ref<const typename E::value_type> x, matrix_ref<typename E::value_type> y,
             std::span<typename E::value_type> saved) {
      { e.input_dim() } -> std::convertible_to<std::size_t>;
      { e.output_dim() } -> std::convertible_to<std::size_t>;
      { e.parameter_count() } -> std::convertible_to<std::size_t>;
      { e.saved_size(rows) } -> std::convertible_to<std::size_t>;
      e.forward(backend::reference{}, params, x, y, saved);
    };

/// An expert that also runs backward.
///
/// Requires additionally:
/// - `e.scratch_size(rows)`: temporary T backward needs for `rows` rows;
/// - `e.backward(backend::reference{}, params, x, saved, dy, dx, dparams, scratch)`, given the
///   forward's `params`, `x` and `saved` and the output gradient `dy` ([rows, output_dim]),
///   overwrites `dx` ([rows, input_dim]) with ∂ℓ/∂x and `dparams` (parameter_count() values)
///   with ∂ℓ/∂params. `scratch` holds scratch_size(rows) values.
template <class E>
concept differentiable_expert =
    expert<E> &&
    requires(const E& e, std::size_t rows, std::span<const typename E::value_type> params,
             matrix_ref<const typename E::value_type> x,
             std::span<const typename E::value_type> saved,
             matrix_ref<const typename E::value_type> dy, matrix_ref<typename E::value_type> dx,
             std::span<typename E::value_type> dparams,
             std::span<typename E::value_type> scratch) {
      { e.scratch_size(rows) } -> std::convertible_to<std::size_t>;
      e.backward(backend::reference{}, params, x, saved, dy, dx, dparams, scratch);
    };

/// A differentiable expert whose parameters form a named layout (smear/layout.hpp), so a
/// weighted sum of parameter vectors is again a valid expert: what SMEAR merges.
///
/// Requires additionally `e.layout()` returning a parameter_layout that tiles
/// [0, parameter_count()). An expert that declares `static constexpr bool residual = true`
/// has its input added to its output by the layer (input_dim must equal output_dim).
template <class E>
concept mergeable_expert = differentiable_expert<E> && requires(const E& e) {
  { e.layout() } -> std::convertible_to<parameter_layout>;
};

/// True when the layer adds the input to the expert's output (the expert declares
/// `static constexpr bool residual = true`).
template <class E>
inline constexpr bool is_residual_expert = requires { requires static_cast<bool>(E::residual); };

/// True when each output row of the expert depends on the same input row only (the expert
/// declares `static constexpr bool row_wise = true`), and so saved_size and scratch_size grow
/// linearly with the rows: the layer may then run consecutive examples that share a parameter
/// vector (the inference cache) as one block of rows.
template <class E>
inline constexpr bool is_row_wise_expert = requires { requires static_cast<bool>(E::row_wise); };

namespace detail {

/// Checks mergeable_expert one requirement at a time, so the compiler's first error is a
/// sentence naming the missing member rather than a list of unsatisfied constraints.
template <class E>
consteval bool diagnose_mergeable_expert() {
  static_assert(requires { typename E::value_type; },
                "smear: an expert type must declare `using value_type = float;` (or double)");
  if constexpr (requires { typename E::value_type; }) {
    using T = typename E::value_type;
    static_assert(floating_point_value<T>, "smear: an expert's value_type must be float or double");
    static_assert(requires(const E& e) {
      { e.input_dim() } -> std::convertible_to<std::size_t>;
      { e.output_dim() } -> std::convertible_to<std::size_t>;
    }, "smear: an expert type must have `std::size_t input_dim() const` and "
       "`std::size_t output_dim() const`");
    static_assert(requires(const E& e) {
      { e.parameter_count() } -> std::convertible_to<std::size_t>;
    }, "smear: an expert type must have `std::size_t parameter_count() const`");
    static_assert(requires(const E& e, std::size_t r) {
      { e.saved_size(r) } -> std::convertible_to<std::size_t>;
    }, "smear: an expert type must have `std::size_t saved_size(std::size_t rows) const`");
    static_assert(requires(const E& e, std::span<const T> p, matrix_ref<const T> x,
                           matrix_ref<T> y, std::span<T> s) {
      e.forward(backend::reference{}, p, x, y, s);
    }, "smear: an expert type must have `void forward(Backend, std::span<const T> params, "
       "matrix_ref<const T> x, matrix_ref<T> y, std::span<T> saved) const`");
    static_assert(requires(const E& e, std::size_t r) {
      { e.scratch_size(r) } -> std::convertible_to<std::size_t>;
    }, "smear: an expert type must have `std::size_t scratch_size(std::size_t rows) const`");
    static_assert(requires(const E& e, std::span<const T> p, matrix_ref<const T> x,
                           std::span<const T> s, matrix_ref<const T> dy, matrix_ref<T> dx,
                           std::span<T> dp, std::span<T> scratch) {
      e.backward(backend::reference{}, p, x, s, dy, dx, dp, scratch);
    }, "smear: an expert type must have `void backward(Backend, std::span<const T> params, "
       "matrix_ref<const T> x, std::span<const T> saved, matrix_ref<const T> dy, "
       "matrix_ref<T> dx, std::span<T> dparams, std::span<T> scratch) const`");
    static_assert(requires(const E& e) {
      { e.layout() } -> std::convertible_to<parameter_layout>;
    }, "smear: an expert type must have `smear::parameter_layout layout() const`");
  }
  return mergeable_expert<E>;
}

}  // namespace detail
}  // namespace smear
