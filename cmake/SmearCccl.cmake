# Finds the CUDA toolkit's CCCL headers (Thrust, CUB, libcu++) as SMEAR_CCCL_INCLUDE_DIR, after
# find_package(CUDAToolkit). Used by smear's own build (SmearCuda.cmake) and by the installed
# smearConfig.cmake, so the exported smear::cuda names no path of the machine it was built on.
find_path(SMEAR_CCCL_INCLUDE_DIR thrust/version.h
  HINTS ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES cccl NO_DEFAULT_PATH)
