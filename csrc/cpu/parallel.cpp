/* parallel.cpp -- the thread part of parallel_for (see parallel.h).
 *
 * Chunks are contiguous: chunk k covers begin + base*k + min(k, rem) ... so the first `rem`
 * chunks hold one extra item. The calling thread runs chunk 0, workers the others.
 *
 * Workers are persistent: a pool that grows to the largest thread count asked for and whose
 * threads sleep on a condition variable between calls. Waking a sleeping thread costs a few
 * microseconds where starting one costs tens, which matters for a gemv that takes ~100 us.
 * The pool serves one call at a time; a call that finds it busy (kernels called from several
 * Python threads at once) starts short-lived threads instead, as does one whose workers cannot
 * be started. After fork() the child gets a new, empty pool (the parent's threads do not exist
 * there). The pool and its threads are never destroyed: they live until the process exits, so
 * no thread is joined or destroyed during static destruction.
 */
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define LOWBIT_HAVE_PTHREAD_ATFORK 1
#endif

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

/* One parallel_for: how to cut [begin, end) into `chunks` pieces. */
struct Job {
    RangeFn fn = nullptr;
    void *ctx = nullptr;
    int64_t begin = 0, base = 0, rem = 0, chunks = 0;

    Chunk chunk(int64_t k) const {
        const int64_t lo = begin + base * k + std::min(k, rem);
        return Chunk{fn, ctx, lo, lo + base + (k < rem ? 1 : 0)};
    }
};

/* Runs chunks 1..chunks-1 on short-lived threads (those that fail to start run here) and chunk 0
 * here. */
void run_on_new_threads(const Job &job) {
    std::vector<std::thread> workers;
    try {
        workers.reserve(static_cast<size_t>(job.chunks - 1));
    } catch (...) {
        for (int64_t k = 0; k < job.chunks; ++k) job.chunk(k)(); /* cannot even allocate */
        return;
    }
    for (int64_t k = 1; k < job.chunks; ++k) {
        const Chunk c = job.chunk(k);
        try {
            workers.emplace_back(c);
        } catch (...) {
            c(); /* thread could not start (resource limits): do this chunk here */
        }
    }
    job.chunk(0)();
    for (std::thread &t : workers) t.join();
}

class Pool {
  public:
    /* Runs job on the pool; false (nothing run) when the pool is busy or cannot grow enough. */
    bool run(const Job &job) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock() || !grow(job.chunks - 1)) return false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = job;
            pending_ = job.chunks - 1;
            ++generation_;
        }
        wake_.notify_all();
        job.chunk(0)();
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] { return pending_ == 0; });
        return true;
    }

  private:
    /* Makes sure `count` workers exist (worker i runs chunk i; chunk 0 is the caller's). A new
     * worker waits for the first job published after it was created, however late it starts. */
    bool grow(int64_t count) {
        while (started_ < count) {
            uint64_t now;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                now = generation_;
            }
            try {
                std::thread(&Pool::work, this, started_ + 1, now).detach();
            } catch (...) {
                return false;
            }
            ++started_;
        }
        return true;
    }

    void work(int64_t index, uint64_t seen) {
        for (;;) {
            Job job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                job = job_;
            }
            if (index >= job.chunks) continue; /* not needed this time */
            job.chunk(index)();
            std::lock_guard<std::mutex> lock(mutex_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex busy_;  /* held by the caller for the whole call */
    std::mutex mutex_; /* guards everything below */
    std::condition_variable wake_, done_;
    uint64_t generation_ = 0;
    Job job_;
    int64_t pending_ = 0;
    int64_t started_ = 0; /* written under busy_ only */
};

std::atomic<Pool *> g_pool{nullptr};

#if defined(LOWBIT_HAVE_PTHREAD_ATFORK)
void forget_pool_in_child() { g_pool.store(nullptr); } /* the parent's pool is leaked in the child */
#endif

Pool *pool() {
    Pool *p = g_pool.load(std::memory_order_acquire);
    if (p != nullptr) return p;
    Pool *fresh = new (std::nothrow) Pool();
    if (fresh == nullptr) return nullptr;
    if (!g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
        delete fresh; /* another thread won the race; it has no threads yet */
        return p;
    }
#if defined(LOWBIT_HAVE_PTHREAD_ATFORK)
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
#endif
    return fresh;
}

} // namespace

void parallel_for_impl(int64_t begin, int64_t end, int num_threads, int64_t grain, RangeFn fn,
                       void *ctx) {
    if (end <= begin) return;
    const int64_t items = end - begin;
    if (grain < 1) grain = 1;

    int64_t threads = 1;
    if (num_threads > 1) threads = std::min<int64_t>({int64_t{num_threads}, items / grain, kMaxThreads});
    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.begin = begin;
    job.chunks = std::max<int64_t>(threads, 1);
    job.base = items / job.chunks;
    job.rem = items % job.chunks;
    if (job.chunks == 1) {
        job.chunk(0)();
        return;
    }
    Pool *p = pool();
    if (p == nullptr || !p->run(job)) run_on_new_threads(job);
}

} // namespace cpu
} // namespace lowbit
