#pragma once
/// \file backend/kernels.hpp
/// Every host backend's kernels (reference and cpu).
#include "smear/backend/cpu/kernels.hpp"
#include "smear/backend/reference/kernels.hpp"
