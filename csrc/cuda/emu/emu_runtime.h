/* emu_runtime.h -- just enough of the CUDA runtime and device model to run csrc/cuda's kernels on
 * the CPU, for tests on machines without a GPU (tests/test_gpu_backends.py builds
 * liblowbit_cuda_emu.so from the same .cu files with -x c++ -DLOWBIT_EMULATION=1).
 *
 * Model: a launch runs its CTAs one after another; the threads of a CTA are fibers (ucontext)
 * on the calling thread, switched only at __syncthreads / __syncthreads_and / __shfl_xor_sync.
 * So:
 *  - __shared__ is `static`, placed in one ELF section (lowbit_emu_shared): one CTA at a time,
 *    statics are that CTA's shared memory. The scheduler fills the whole section with a poison
 *    byte pattern (0xFF: floats read NaN, integers -1) before every CTA, so a kernel that reads
 *    shared memory it did not write in this CTA -- a previous CTA's data on a CPU, garbage on a
 *    GPU -- computes with poison instead of passing by luck;
 *  - between two synchronization points the fibers of a CTA run one after another, and the order
 *    changes from one such phase to the next (by index, reversed, shuffled: chosen from the CTA
 *    and phase numbers, so runs are reproducible). A missing __syncthreads lets a reader run
 *    before the writer in some phase of some CTA: with the poison above it reads garbage, as it
 *    could on a GPU. LOWBIT_EMU_SCHEDULE=index restores the plain index order and no poison (to
 *    show that a test catches a planted race only because of these two); LOWBIT_EMU_LAST_CTAS=k
 *    runs only the last k CTAs of each launch (tests of the 64-bit index math at the end of
 *    launches over more than 2^31 elements);
 *  - threadIdx/blockIdx/blockDim/gridDim are globals the scheduler sets before resuming a fiber;
 *  - a shuffle is a warp-wide exchange: all 32 lanes of the warp must take part (the emulator
 *    aborts with a message if a lane has exited or the warp is incomplete -- undefined behaviour
 *    on a GPU with a full mask), and __syncthreads waits for every thread that has not exited;
 *  - memory is host memory; "device" pointers are ordinary pointers; streams are ignored and
 *    every launch is synchronous; managed memory is malloc.
 * What it checks: indexing, tails, group/warp reductions, barriers, packing, vector-access
 * alignment, the launchers and the C ABI. What it cannot: timing, races between CTAs, and the
 * float behaviour of a real GPU (the host's IEEE arithmetic stands in for it).
 * Not thread-safe across concurrent launches (a mutex serializes them).
 */
#ifndef LOWBIT_CUDA_EMU_RUNTIME_H
#define LOWBIT_CUDA_EMU_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("lowbit_emu_shared")))

namespace lowbit {
namespace emu {

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

extern dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

/* Runs body() once per thread of every CTA of the grid (1-D grids and CTAs). */
void run_grid(dim3 grid, dim3 block, const std::function<void()> &body);
void sync_block();
int sync_block_and(int predicate);
/* Exchanges 8 bytes with lane (lane ^ lane_mask) of the calling warp. */
uint64_t warp_exchange(uint64_t value, int lane_mask);
/* Aborts with a message unless `pointer` is a multiple of `bytes` (a GPU would fault). */
void check_aligned(const void *pointer, int bytes);
/* Records a launch error (returned by the next cudaGetLastError). */
void set_launch_error(int error);
int take_launch_error();

template <class F>
struct Launch {
    dim3 grid, block;
    F *kernel;
    Launch(dim3 g, dim3 b, F *k) : grid(g), block(b), kernel(k) {}
    template <class... Args>
    void operator()(Args... args) const {
        F *k = kernel;
        run_grid(grid, block, [&]() { k(args...); });
    }
};
template <class F>
Launch(dim3, dim3, F *) -> Launch<F>;

} // namespace emu
} // namespace lowbit

#define threadIdx (::lowbit::emu::g_thread_idx)
#define blockIdx (::lowbit::emu::g_block_idx)
#define blockDim (::lowbit::emu::g_block_dim)
#define gridDim (::lowbit::emu::g_grid_dim)

struct uint4 {
    unsigned x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline void __syncthreads() { ::lowbit::emu::sync_block(); }
inline int __syncthreads_and(int predicate) { return ::lowbit::emu::sync_block_and(predicate); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    if (mask != 0xffffffffu) abort(); /* the kernels only use full-warp shuffles */
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof value);
    bits = ::lowbit::emu::warp_exchange(bits, lane_mask);
    T result;
    memcpy(&result, &bits, sizeof result);
    return result;
}
inline double atomicAdd(double *address, double value) { /* fibers switch only at barriers */
    const double old = *address;
    *address = old + value;
    return old;
}

/* ---- runtime API subset ----------------------------------------------------------------------- */
typedef int cudaError_t;
typedef void *cudaStream_t;
enum : int {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
};
enum cudaDeviceAttr { cudaDevAttrConcurrentManagedAccess = 89, cudaDevAttrMultiProcessorCount = 16 };
enum : unsigned { cudaMemAttachGlobal = 1 };
enum : int { cudaCpuDeviceId = -1 };
struct cudaFuncAttributes {
    int maxThreadsPerBlock;
};

inline cudaError_t cudaGetLastError() { return ::lowbit::emu::take_launch_error(); }
inline const char *cudaGetErrorName(cudaError_t e) {
    return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorInvalidValue ? "cudaErrorInvalidValue"
           : e == cudaErrorMemoryAllocation ? "cudaErrorMemoryAllocation" : "cudaErrorInvalidConfiguration";
}
inline const char *cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetDevice(int *device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int *count) { *count = 1; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int *v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int *v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *a, const void *) {
    a->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}
/* One multiprocessor: launchers that size grids by the SM count take their small-grid paths. */
inline cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr, int) { *value = 1; return cudaSuccess; }
inline cudaError_t cudaMallocManaged(void **p, size_t bytes, unsigned) {
    *p = malloc(bytes);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemPrefetchAsync(const void *, size_t, int, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t) {
    memset(p, value, bytes);
    return cudaSuccess;
}

#endif /* LOWBIT_CUDA_EMU_RUNTIME_H */
