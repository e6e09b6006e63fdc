/* parallel.h -- a minimal parallel_for over block ranges, on std::thread.
 *
 * parallel_for(begin, end, num_threads, grain, fn) calls fn(lo, hi) on contiguous, disjoint
 * chunks that cover [begin, end) exactly once. It stays on the calling thread when
 * num_threads <= 1 or there is too little work (fewer than 2 * grain items); otherwise it uses
 * at most num_threads threads (the caller among them) and at most items / grain of them; the
 * threads take chunks dynamically, shrinking as the range runs out, to no fewer than grain / 4
 * items (see parallel.cpp). Each chunk runs under FpEnvGuard. An optional NextStream names the
 * memory the next call will read, for the pool's workers to prefetch once they are done.
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

/* Memory the next call is expected to stream, each range read front to back as that call's
 * items are (the next layer's absmax and weights: call_order.h). A worker with no chunk left
 * prefetches its share of it (worker_share) until a new job comes. Only a hint: the addresses
 * are never dereferenced, so they may be stale. */
struct NextStream {
    static constexpr int kMaxRanges = 2;
    const void *base[kMaxRanges] = {};
    int64_t bytes[kMaxRanges] = {};
    int count = 0;
};

/* What worker `worker` (1..threads-1) of a call on `threads` threads prefetches of `next`: in
 * each range, the same fraction, together at most `budget` bytes (give or take a line a range),
 * from where the worker's first chunk is likely to start. The chunks are taken in order, each
 * 1 / threads of what is left (parallel.cpp): the caller usually takes the first, so chunk
 * `worker` starts 1 - (1 - 1 / threads)^worker of the way in. */
NextStream worker_share(const NextStream &next, int64_t worker, int64_t threads, int64_t budget);

/* Non-template core (parallel.cpp). */
void parallel_for_impl(int64_t begin, int64_t end, int num_threads, int64_t grain, RangeFn fn,
                       void *ctx, const NextStream *next);

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int num_threads, int64_t grain, F &&fn,
                         const NextStream *next = nullptr) {
    using Fn = typename std::remove_reference<F>::type;
    parallel_for_impl(
        begin, end, num_threads, grain,
        [](void *ctx, int64_t lo, int64_t hi) { (*static_cast<Fn *>(ctx))(lo, hi); },
        const_cast<void *>(static_cast<const void *>(&fn)), next);
}

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_PARALLEL_H */
