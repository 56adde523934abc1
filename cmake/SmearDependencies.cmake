# Finds what smear::smear needs. Used by smear's own build and by the installed
# smearConfig.cmake, so a consumer resolves the same dependencies the same way.
include(CMakeFindDependencyMacro)
# No version in the call: Eigen 5's version file takes "3.3" to mean 3.3.x only, and no range
# accepts both Debian's 3.4 and vcpkg's 5; the minimum is checked here instead.
find_dependency(Eigen3 NO_MODULE)
if(DEFINED Eigen3_VERSION AND Eigen3_VERSION VERSION_LESS 3.3)
  message(FATAL_ERROR "smear needs Eigen 3.3 or newer; found ${Eigen3_VERSION} in ${Eigen3_DIR}")
endif()
find_dependency(xsimd)
# Debian's xsimd 8 exports a link to a target "xtl" it never defines (xsimd is header-only and
# smear does not use its xtl integration); give that name an empty target so it does not turn
# into "-lxtl" at link time.
if(TARGET xsimd AND NOT TARGET xtl)
  find_package(xtl QUIET)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
# the cpu backend's thread pool (std::thread)
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_dependency(Threads)
