#pragma once
/// \file smear.hpp
/// Everything smear offers. Includes only.

#include "smear/version.hpp"
#include "smear/error.hpp"
#include "smear/tensor.hpp"
#include "smear/random.hpp"
#include "smear/activation.hpp"
#include "smear/layout.hpp"
#include "smear/parameter.hpp"
#include "smear/concepts.hpp"
#include "smear/backend/tags.hpp"
#include "smear/backend/kernels.hpp"
#include "smear/experts/adapter.hpp"
#include "smear/experts/lora.hpp"
#include "smear/experts/linear.hpp"
#include "smear/experts/conv_adapter.hpp"
#include "smear/experts/archetypes.hpp"
#include "smear/bank.hpp"
#include "smear/routing/router.hpp"
#include "smear/layer.hpp"
#include "smear/optim/sgd.hpp"
#include "smear/optim/adamw.hpp"
