/* emu_race_test.cpp -- two planted kernel bugs that the GPU emulation (csrc/cuda/emu) must expose.
 *
 *  missing_barrier: thread 0 fills a shared array that every thread then reads, without the
 *    __syncthreads in between (racy on a GPU). Run in thread-index order, thread 0 always writes
 *    first and the bug is invisible; with the emulator's varied order some CTA runs a reader
 *    first and reads the shared-memory poison.
 *  stale_shared: only the first CTA initializes a shared variable the others read (on a GPU they
 *    read garbage). With shared memory kept from CTA to CTA every CTA reads the first one's
 *    value; with the per-CTA poison they do not.
 * Each kernel also runs in a correct form (the barrier present, every CTA initializing), which
 * must pass under any schedule. Output: one line per case, "<name> ok" or "<name> wrong".
 * tests/test_gpu_backends.py runs it under the emulator's default schedule and under
 * LOWBIT_EMU_SCHEDULE=index (the old one) and compares.
 */
#include <stdio.h>

#include <vector>

#include "emu/emu_runtime.h"

namespace {

constexpr unsigned kThreads = 64;
constexpr unsigned kBlocks = 6;

__global__ void k_fill_then_read(int *out, int with_barrier) {
    __shared__ int value[kThreads];
    if (threadIdx.x == 0)
        for (unsigned i = 0; i < kThreads; ++i) value[i] = static_cast<int>(1000 + blockIdx.x * kThreads + i);
    if (with_barrier) __syncthreads();
    out[blockIdx.x * kThreads + threadIdx.x] = value[threadIdx.x];
}

__global__ void k_shared_total(int *out, int every_block_initializes) {
    __shared__ int total;
    if (threadIdx.x == 0 && (every_block_initializes || blockIdx.x == 0)) total = 7;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = total;
}

bool fill_then_read(int with_barrier) {
    std::vector<int> out(kThreads * kBlocks, 0);
    lowbit::emu::Launch(lowbit::emu::dim3(kBlocks), lowbit::emu::dim3(kThreads), k_fill_then_read)(out.data(), with_barrier);
    for (unsigned i = 0; i < out.size(); ++i)
        if (out[i] != static_cast<int>(1000 + i)) return false;
    return true;
}

bool shared_total(int every_block_initializes) {
    std::vector<int> out(kBlocks, 0);
    lowbit::emu::Launch(lowbit::emu::dim3(kBlocks), lowbit::emu::dim3(kThreads), k_shared_total)(out.data(), every_block_initializes);
    for (int v : out)
        if (v != 7) return false;
    return true;
}

} // namespace

int main() {
    printf("missing_barrier %s\n", fill_then_read(0) ? "ok" : "wrong");
    printf("with_barrier %s\n", fill_then_read(1) ? "ok" : "wrong");
    printf("stale_shared %s\n", shared_total(0) ? "ok" : "wrong");
    printf("initialized_shared %s\n", shared_total(1) ? "ok" : "wrong");
    return 0;
}
