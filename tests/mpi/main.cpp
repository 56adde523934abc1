// The MPI test program's main: MPI around doctest. Every process runs every test case in the
// same order (their collectives pair up); mpirun fails when any process fails.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstdlib>

int main(int argc, char** argv) {
  setenv("SMEAR_NUM_THREADS", "1", 0);  // R processes on two cores: one thread each
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);  // smear::mpi throws on errors
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  doctest::Context context(argc, argv);
  if (rank != 0) context.setOption("minimal", true);  // rank 0 reports in full, the others their failures
  const int failed = context.run();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
