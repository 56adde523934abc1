# smear_project_options: what smear's own targets (tests, examples, benchmarks) build with.
# Never attached to smear::smear itself, so users' builds keep their own flags.
add_library(smear_project_options INTERFACE)
target_compile_options(smear_project_options INTERFACE
  -Wall -Wextra -Wpedantic -Wconversion -Wshadow
  $<$<BOOL:${SMEAR_WERROR}>:-Werror>)
if(SMEAR_SANITIZE)
  target_compile_options(smear_project_options INTERFACE
    -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_link_options(smear_project_options INTERFACE -fsanitize=address,undefined)
endif()

# smear_native_options: smear's own targets built for the host CPU (the benchmarks, and the
# GEMM tests once more, so the direct kernels' AVX2/AVX-512 register tiles are tested too).
include(CheckCXXCompilerFlag)
check_cxx_compiler_flag(-march=native SMEAR_HAVE_MARCH_NATIVE)
add_library(smear_native_options INTERFACE)
if(SMEAR_HAVE_MARCH_NATIVE)
  target_compile_options(smear_native_options INTERFACE -march=native)
  # GCC 12 reports its own _mm512_undefined_ps() as (maybe-)uninitialized once Eigen's AVX-512
  # shuffles are inlined (GCC bug 105593, fixed in GCC 13): a false positive in system headers.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(smear_native_options INTERFACE -Wno-maybe-uninitialized -Wno-uninitialized)
  endif()
endif()
