/* parallel.cpp -- the thread part of parallel_for (see parallel.h).
 *
 * Chunks are contiguous: chunk k covers begin + base*k + min(k, rem) ... so the first `rem`
 * chunks hold one extra item. There are up to kChunksPerThread chunks per thread, and the threads
 * (the caller among them) take them one by one from a shared counter: on a machine where other
 * processes compete for the cores, a thread that is descheduled holds up the call only for the
 * chunk it is running, not for a fixed share of the work; the caller returns as soon as every
 * chunk is done, without waiting for workers that never got to run.
 *
 * Workers are persistent: a pool that grows to the largest thread count asked for and whose
 * threads sleep on a condition variable between calls. Waking a sleeping thread costs a few
 * microseconds where starting one costs tens, which matters for a gemv that takes ~100 us; on
 * virtual machines a wake-up takes 20-60 us, so both sides first wait briefly awake (kSpin,
 * yielding the core to any other runnable thread): the workers for the next job, the caller for
 * the workers' last chunks. Decoding calls one product per layer back to back, and the two
 * wake-ups cost ~60 us per call (15% of a 4096 x 4096 NF4 layer's time), measured on a 2-vCPU VM.
 * The pool serves one call at a time; a call that finds it busy (kernels called from several
 * Python threads at once) starts short-lived threads instead, as does one whose workers cannot
 * be started. After fork() the child gets a new, empty pool (the parent's threads do not exist
 * there). The pool and its threads are never destroyed: they live until the process exits, so
 * no thread is joined or destroyed during static destruction.
 */
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
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
/* Chunks per thread (each still at least `grain` items): small enough that a thread which lost
 * its core leaves little behind it, large enough that taking a chunk costs nothing. */
constexpr int64_t kChunksPerThread = 4;
/* How long a worker stays awake for the next job, and the caller for the last chunks, before
 * sleeping on a condition variable. */
constexpr std::chrono::microseconds kSpin{200};

/* Until ready() or kSpin has passed, yielding the core meanwhile; whether ready() held. */
template <class Ready>
bool spin_until(Ready &&ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!ready()) {
        if (std::chrono::steady_clock::now() >= until) return false;
        std::this_thread::yield();
    }
    return true;
}

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
    /* Runs job on the caller and `workers` pool threads; false (nothing run) when the pool is busy
     * or cannot grow enough. */
    bool run(const Job &job, int64_t workers) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock() || !grow(workers)) return false;
        uint64_t generation;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = job;
            job_workers_ = workers;
            generation = generation_.load(std::memory_order_relaxed) + 1;
            done_chunks_.store(0, std::memory_order_relaxed);
            next_.store(generation << 32, std::memory_order_release);
            generation_.store(generation, std::memory_order_release); /* last: spinning workers start */
        }
        wake_.notify_all();
        run_chunks(job, generation);
        const auto done = [&] { return done_chunks_.load(std::memory_order_acquire) == job.chunks; };
        if (spin_until(done)) return true;
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, done);
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
                now = generation_.load(std::memory_order_relaxed);
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

    /* Takes chunks of the job of `generation` until none is left (or a newer job started: a
     * worker that wakes late must not take the next job's chunks with this job's function). */
    void run_chunks(const Job &job, uint64_t generation) {
        uint64_t next = next_.load(std::memory_order_acquire);
        for (;;) {
            if ((next >> 32) != (generation & 0xFFFFFFFFu) || static_cast<int64_t>(next & 0xFFFFFFFFu) >= job.chunks)
                return;
            if (!next_.compare_exchange_weak(next, next + 1, std::memory_order_acq_rel)) continue;
            job.chunk(static_cast<int64_t>(next & 0xFFFFFFFFu))();
            if (done_chunks_.fetch_add(1, std::memory_order_acq_rel) + 1 == job.chunks) {
                std::lock_guard<std::mutex> lock(mutex_); /* the caller checks under it: no lost wake-up */
                done_.notify_one();
            }
            next = next_.load(std::memory_order_acquire);
        }
    }

    void work(int64_t index, uint64_t seen) {
        for (;;) {
            Job job;
            uint64_t generation;
            const auto published = [&] { return generation_.load(std::memory_order_acquire) != seen; };
            spin_until(published);
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, published);
                seen = generation = generation_.load(std::memory_order_relaxed);
                if (index > job_workers_) continue; /* not needed this time */
                job = job_;
            }
            run_chunks(job, generation);
        }
    }

    std::mutex busy_;  /* held by the caller for the whole call */
    std::mutex mutex_; /* guards everything below but the atomics */
    std::condition_variable wake_, done_;
    std::atomic<uint64_t> generation_{0};   /* written under mutex_, read by spinning workers too */
    Job job_;
    int64_t job_workers_ = 0;
    std::atomic<uint64_t> next_{0};         /* generation << 32 | next chunk to take */
    std::atomic<int64_t> done_chunks_{0};   /* chunks of the current job finished */
    int64_t started_ = 0;                   /* written under busy_ only */
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
    if (job.chunks == 1) {
        job.base = items;
        job.chunk(0)();
        return;
    }
    Job pooled = job; /* the pool's threads take finer chunks from a counter */
    pooled.chunks = std::min<int64_t>(threads * kChunksPerThread, items / grain);
    pooled.base = items / pooled.chunks;
    pooled.rem = items % pooled.chunks;
    Pool *p = pool();
    if (p != nullptr && p->run(pooled, threads - 1)) return;
    job.base = items / job.chunks;
    job.rem = items % job.chunks;
    run_on_new_threads(job);
}

} // namespace cpu
} // namespace lowbit
