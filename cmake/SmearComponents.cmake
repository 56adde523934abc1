# smear's optional components on top of smear::smear, each defined only when what it needs is
# found, so the core never requires it:
#   smear::io   the checkpoint headers (include/smear/io/): nlohmann/json
#   smear::mpi  <smear/mpi.hpp>, data- and tensor-parallel training: an MPI usable from C++

# smear::<name> (target smear_<name>, exported as <name>) linking smear and `dependency`.
function(smear_add_component name dependency)
  add_library(smear_${name} INTERFACE)
  add_library(smear::${name} ALIAS smear_${name})
  set_target_properties(smear_${name} PROPERTIES EXPORT_NAME ${name})
  target_link_libraries(smear_${name} INTERFACE smear ${dependency})
endfunction()

find_package(nlohmann_json 3.2 QUIET CONFIG)
if(nlohmann_json_FOUND)
  smear_add_component(io nlohmann_json::nlohmann_json)
else()
  message(STATUS "smear: nlohmann_json not found, smear::io (safetensors checkpoints) disabled")
endif()

set(MPI_DETERMINE_LIBRARY_VERSION TRUE)  # MPI_CXX_LIBRARY_VERSION_STRING: which MPI (below)
find_package(MPI QUIET COMPONENTS CXX)
if(MPI_CXX_FOUND)
  smear_add_component(mpi MPI::MPI_CXX)
  # What smear's own tests pass to mpiexec: --oversubscribe where Open MPI needs it for more
  # processes than cores, and an environment that lets Open MPI run as root (CI does) and
  # keeps ASan's leak check off Open MPI's own allocations.
  set(SMEAR_MPIEXEC_OVERSUBSCRIBE "")
  if(MPI_CXX_LIBRARY_VERSION_STRING MATCHES "Open MPI")
    set(SMEAR_MPIEXEC_OVERSUBSCRIBE --oversubscribe)
  endif()
  set(SMEAR_MPIEXEC_ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;ASAN_OPTIONS=detect_leaks=0")
else()
  message(STATUS "smear: MPI not found, smear::mpi (data- and tensor-parallel training) disabled")
endif()
