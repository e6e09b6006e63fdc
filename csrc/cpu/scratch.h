/* scratch.h -- a per-thread, grow-only float buffer for kernels that rearrange a small input once
 * per call (gemv_4bit's activations), so that the call allocates nothing once warm.
 *
 * thread_scratch(count) returns 64-byte-aligned room for `count` floats, owned by the calling
 * thread and valid until that thread calls it again; nullptr if it cannot grow. Other threads may
 * read it while the owner waits for them (parallel_for). Compiled once (baseline ISA).
 */
#ifndef LOWBIT_CPU_SCRATCH_H
#define LOWBIT_CPU_SCRATCH_H

#include <stddef.h>

namespace lowbit {
namespace cpu {

float *thread_scratch(size_t count);

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_SCRATCH_H */
