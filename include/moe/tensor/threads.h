// Thread count of the CPU kernels (ours and OpenBLAS's). It starts from OMP_NUM_THREADS (all
// cores when unset); set_num_threads changes it for the whole process.
#pragma once

namespace moe {

// Sets the threads used by later kernel calls from this thread (OpenMP and OpenBLAS). Throws
// moe::Error when count < 1.
void set_num_threads(int count);
// The threads a kernel called now would use.
int num_threads();

}  // namespace moe
