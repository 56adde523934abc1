#pragma once
/// \file backend/tags.hpp
/// Backends are empty tag types. A more capable backend derives from a simpler one, so a
/// kernel or an expert that has no overload for `cpu` falls back to its `reference` one.

namespace smear::backend {

/// Plain loops in the element type: slow, obviously right, the oracle of every test.
struct reference {};

/// Direct and Eigen GEMMs over mapped buffers (the direct kernel's instruction set chosen at
/// run time), xsimd element-wise loops, the batch spread over smear's thread pool.
struct cpu : reference {};

/// cuBLAS and Thrust on an NVIDIA GPU (see smear/backend/cuda/); only with a CUDA compiler.
struct cuda {};

}  // namespace smear::backend

#ifndef SMEAR_DEFAULT_BACKEND
/// The backend a layer uses when none is named; define before including smear to change it.
#define SMEAR_DEFAULT_BACKEND ::smear::backend::cpu
#endif

namespace smear {
using default_backend = SMEAR_DEFAULT_BACKEND;
}
