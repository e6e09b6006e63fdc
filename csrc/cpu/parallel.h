/* parallel.h -- a minimal parallel_for over block ranges, on std::thread.
 *
 * parallel_for(begin, end, num_threads, grain, fn) calls fn(lo, hi) on contiguous, disjoint
 * chunks that cover [begin, end) exactly once. It stays on the calling thread when
 * num_threads <= 1 or there is too little work (fewer than 2 * grain items); otherwise it uses
 * at most num_threads threads (the caller among them) and at most items / grain of them; the
 * threads take chunks dynamically, shrinking as the range runs out, to no fewer than grain / 4
 * items (see parallel.cpp). Each chunk runs under FpEnvGuard.
 *
 * The thread management itself lives in parallel.cpp (a persistent pool of workers), compiled
 * once for the baseline ISA: the template below only wraps `fn` in a plain function pointer, so a
 * kernel TU compiled with -mavx2 / -mavx512f never instantiates std::thread code of its own.
 *
 * fn must not throw (the kernels do not). If a thread cannot be started, its chunk runs on the
 * calling thread instead: the result is the same, only slower.
 */
#ifndef LOWBIT_CPU_PARALLEL_H
#define LOWBIT_CPU_PARALLEL_H

#include <stdint.h>

#include <type_traits>

namespace lowbit {
namespace cpu {

/* Items below this many elements of work are not worth a thread (waking one costs ~5-10 us). */
constexpr int64_t kMinElementsPerThread = int64_t{1} << 16;

/* Grain, in blocks, for block-parallel kernels: enough blocks for kMinElementsPerThread. */
inline int64_t block_grain(int64_t blocksize) {
    return blocksize >= kMinElementsPerThread ? 1
                                              : (kMinElementsPerThread + blocksize - 1) / blocksize;
}

using RangeFn = void (*)(void *ctx, int64_t lo, int64_t hi);

/* Non-template core (parallel.cpp). */
void parallel_for_impl(int64_t begin, int64_t end, int num_threads, int64_t grain, RangeFn fn,
                       void *ctx);

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int num_threads, int64_t grain, F &&fn) {
    using Fn = typename std::remove_reference<F>::type;
    parallel_for_impl(
        begin, end, num_threads, grain,
        [](void *ctx, int64_t lo, int64_t hi) { (*static_cast<Fn *>(ctx))(lo, hi); },
        const_cast<void *>(static_cast<const void *>(&fn)));
}

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_PARALLEL_H */
