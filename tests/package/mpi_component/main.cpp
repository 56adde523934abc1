// An installed smear::mpi consumer: averages a layer's gradients over the processes.
#include <cstdio>
#include <smear/mpi.hpp>
#include <smear/smear.hpp>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  {
    smear::mpi::data_parallel<double> dp;
    smear::layer<smear::adapter<double>, 2> block{smear::adapter<double>{4, 2}};
    auto params = block.parameters();
    for (auto& g : params[0].grad) g = dp.rank() + 1.0;  // process r: r + 1 everywhere
    dp.begin_batch(1);                                    // one example each: equal weights
    dp.ready(params);
    dp.finish();
    const double want = (dp.size() + 1) / 2.0;  // the mean of 1..R
    for (double g : params[0].grad)
      if (g != want) rc = 1;
    if (dp.rank() == 0) std::printf("smear::mpi consumer: %d processes, gradient %g (want %g)\n", dp.size(),
                                    params[0].grad[0], want);
  }
  MPI_Finalize();
  return rc;
}
