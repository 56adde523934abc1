#pragma once
/// \file cuda.hpp
/// Everything smear offers plus the cuda backend: `smear::layer<Expert, N, smear::backend::cuda>`.
/// Include this (not smear/smear.hpp) in files compiled by nvcc that use the GPU; the rest of
/// smear never includes a CUDA header. Link `smear::cuda` (CMake), which exists when the CUDA
/// Toolkit is found.

#if !defined(__CUDACC__)
#error "smear/cuda.hpp needs a CUDA compiler (nvcc); compile this file as CUDA"
#endif

#include "smear/smear.hpp"
#include "smear/backend/cuda/error.hpp"
#include "smear/backend/cuda/context.hpp"
#include "smear/cuda/device_layer.hpp"
#include "smear/cuda/layer.hpp"
#include "smear/cuda/optimizers.hpp"
