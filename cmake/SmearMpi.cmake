# smear::mpi: <smear/mpi.hpp> (data- and tensor-parallel training over MPI) on top of
# smear::smear. Defined only when an MPI installation usable from C++ is found, so nothing else
# of smear needs MPI.
set(MPI_DETERMINE_LIBRARY_VERSION TRUE)  # MPI_CXX_LIBRARY_VERSION_STRING: which MPI (tests/mpi)
find_package(MPI QUIET COMPONENTS CXX)
if(MPI_CXX_FOUND)
  add_library(smear_mpi INTERFACE)
  add_library(smear::mpi ALIAS smear_mpi)
  set_target_properties(smear_mpi PROPERTIES EXPORT_NAME mpi)
  target_link_libraries(smear_mpi INTERFACE smear MPI::MPI_CXX)
else()
  message(STATUS "smear: MPI not found, smear::mpi (data- and tensor-parallel training) disabled")
endif()
