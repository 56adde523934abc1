// The test programs' main: the cpu backend's pool gets three threads unless SMEAR_NUM_THREADS
// says otherwise, more than the two cores CI has (the thread tests need a pool of three, and
// the rest runs with busy, uneven splits).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdlib>

int main(int argc, char** argv) {
  setenv("SMEAR_NUM_THREADS", "3", 0);  // before the pool is made, at its first use
  return doctest::Context(argc, argv).run();
}
