/* parallel.cpp -- the std::thread part of parallel_for (see parallel.h).
 *
 * One short-lived thread per chunk beyond the first; the calling thread runs chunk 0 and then
 * joins the others. Chunks are contiguous: chunk k covers base*k + min(k, rem) ... so the
 * first `rem` chunks hold one extra item. No thread pool yet: kernels only go parallel for
 * >= 2^16 elements per thread, where a thread start is noise.
 */
#include "parallel.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "fp_env.h"

namespace lowbit {
namespace cpu {

namespace {

/* Hard ceiling, whatever the caller asks for. */
constexpr int64_t kMaxThreads = 256;

struct Chunk {
    RangeFn fn;
    void *ctx;
    int64_t lo, hi;
    void operator()() const {
        FpEnvGuard guard;
        fn(ctx, lo, hi);
    }
};

} // namespace

void parallel_for_impl(int64_t begin, int64_t end, int num_threads, int64_t grain, RangeFn fn,
                       void *ctx) {
    if (end <= begin) return;
    const int64_t items = end - begin;
    if (grain < 1) grain = 1;

    int64_t threads = 1;
    if (num_threads > 1) threads = std::min<int64_t>({int64_t{num_threads}, items / grain, kMaxThreads});
    if (threads <= 1) {
        Chunk{fn, ctx, begin, end}();
        return;
    }

    const int64_t base = items / threads;
    const int64_t rem = items % threads;
    auto chunk = [&](int64_t k) {
        const int64_t lo = begin + base * k + std::min(k, rem);
        return Chunk{fn, ctx, lo, lo + base + (k < rem ? 1 : 0)};
    };

    std::vector<std::thread> workers;
    try {
        workers.reserve(static_cast<size_t>(threads - 1));
    } catch (...) {
        Chunk{fn, ctx, begin, end}(); /* cannot even allocate: run everything here */
        return;
    }
    for (int64_t k = 1; k < threads; ++k) {
        const Chunk c = chunk(k);
        try {
            workers.emplace_back(c);
        } catch (...) {
            c(); /* thread could not start (resource limits): do this chunk here */
        }
    }
    chunk(0)();
    for (std::thread &t : workers) t.join();
}

} // namespace cpu
} // namespace lowbit
