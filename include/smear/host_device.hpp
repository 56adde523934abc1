#pragma once
/// \file host_device.hpp
/// SMEAR_HOST_DEVICE marks functions that run on the host and, compiled by nvcc, on a GPU (the
/// element-wise work of the cuda backend, the optimisers' update rules). Define it before
/// including smear to override it.

#include <cmath>
#include <math.h>

#ifndef SMEAR_HOST_DEVICE
#if defined(__CUDACC__)
#define SMEAR_HOST_DEVICE __host__ __device__
#else
#define SMEAR_HOST_DEVICE
#endif
#endif

namespace smear::detail {

SMEAR_HOST_DEVICE inline float sqrt_of(float x) { return ::sqrtf(x); }
SMEAR_HOST_DEVICE inline double sqrt_of(double x) { return ::sqrt(x); }
SMEAR_HOST_DEVICE inline float exp_of(float x) { return ::expf(x); }
SMEAR_HOST_DEVICE inline double exp_of(double x) { return ::exp(x); }

}  // namespace smear::detail
