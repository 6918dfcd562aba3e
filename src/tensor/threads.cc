#include "moe/tensor/threads.h"

#include <cblas.h>
#include <omp.h>

#include "moe/tensor/error.h"

namespace moe {

void set_num_threads(int count) {
  MOE_CHECK(count >= 1, "set_num_threads: thread count must be at least 1, got ", count);
  omp_set_num_threads(count);
  openblas_set_num_threads(count);  // its OpenMP build reads OpenMP's value; others keep their own
}

int num_threads() {
  return omp_get_max_threads();
}

}  // namespace moe
