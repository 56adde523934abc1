# The optional CUDA backend. When the CUDA Toolkit is found (and SMEAR_CUDA is on, the default
# for a top-level build that finds it), this enables the CUDA language and defines:
#   smear::cuda                 INTERFACE target for code compiled by nvcc that includes
#                               <smear/cuda.hpp>: smear::smear + cudart + cuBLAS + CCCL headers;
#   smear_cuda_host_thrust      INTERFACE target (smear's own tests) for host-compiled code using
#                               the cuda backend's Thrust parts on THRUST_DEVICE_SYSTEM_CPP;
#   smear_cuda_project_options  warnings-as-errors for smear's own CUDA targets (nvcc spelling).
# Nothing else in smear needs CUDA: without the toolkit none of these targets exists.
find_package(CUDAToolkit QUIET)
if(CUDAToolkit_FOUND AND PROJECT_IS_TOP_LEVEL)
  set(_smear_cuda_default ON)
else()
  set(_smear_cuda_default OFF)
endif()
option(SMEAR_CUDA "Build smear::cuda, the CUDA backend (needs the CUDA Toolkit)" ${_smear_cuda_default})
if(NOT SMEAR_CUDA)
  return()
endif()
if(NOT CUDAToolkit_FOUND)
  message(FATAL_ERROR "SMEAR_CUDA is ON but the CUDA Toolkit was not found "
                      "(set CUDAToolkit_ROOT, e.g. -DCUDAToolkit_ROOT=/usr/local/cuda)")
endif()

if(NOT CMAKE_CUDA_COMPILER)
  set(CMAKE_CUDA_COMPILER "${CUDAToolkit_NVCC_EXECUTABLE}")
endif()
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # Hopper (H100/H200); one architecture keeps nvcc's compile time modest.
  set(CMAKE_CUDA_ARCHITECTURES 90)
endif()
enable_language(CUDA)

include(SmearCccl)
if(NOT SMEAR_CCCL_INCLUDE_DIR)
  message(FATAL_ERROR "smear: Thrust (CCCL) headers not found under ${CUDAToolkit_INCLUDE_DIRS}")
endif()

add_library(smear_cuda INTERFACE)
add_library(smear::cuda ALIAS smear_cuda)
target_link_libraries(smear_cuda INTERFACE smear::smear CUDA::cudart CUDA::cublas)
# (installed, smearConfig.cmake finds the consumer's own CCCL: SmearCccl.cmake)
target_include_directories(smear_cuda SYSTEM INTERFACE $<BUILD_INTERFACE:${SMEAR_CCCL_INCLUDE_DIR}>)
# (CMake 3.25 does not know nvcc 13 compile features, so the standard is passed directly)
target_compile_options(smear_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)

add_library(smear_cuda_host_thrust INTERFACE)
target_link_libraries(smear_cuda_host_thrust INTERFACE smear::smear)
target_include_directories(smear_cuda_host_thrust SYSTEM INTERFACE
  ${SMEAR_CCCL_INCLUDE_DIR} ${CUDAToolkit_INCLUDE_DIRS})
target_compile_definitions(smear_cuda_host_thrust INTERFACE
  THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP)

add_library(smear_cuda_project_options INTERFACE)
target_compile_options(smear_cuda_project_options INTERFACE
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wconversion,-Wshadow --expt-relaxed-constexpr>
  $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${SMEAR_WERROR}>>:-Werror=all-warnings -Xcompiler=-Werror>)
