// The cpu backend against the reference backend, on every case the cuda backend is checked on:
// every expert type, every strategy, padding, dropout, evaluation mode, the inference cache.

#include <doctest/doctest.h>

#include <smear/smear.hpp>

#include "support/agreement.hpp"

using namespace smear;
using smear::testing::agreement_case;
using smear::testing::random_vector;

namespace {

template <class Expert, std::size_t N>
void check(const Expert& proto, agreement_case c, std::uint64_t seed, layer_options opt = {}) {
  layer<Expert, N, backend::reference> ref{proto, opt, seed};
  layer<Expert, N, backend::cpu> fast{proto, opt, seed};
  testing::host_memory mem;
  testing::check_agreement(ref, fast, mem, c, seed);
}

}  // namespace

#define SMEAR_AGREEMENT_SUBJECT "cpu layer"
#include "support/agreement_cases.hpp"
