/* parallel.cpp -- the thread part of parallel_for (see parallel.h).
 *
 * The threads (the caller among them) take contiguous chunks from a shared counter, each
 * 1 / (kGuidedShare * threads) of what is left (guided scheduling), down to grain /
 * kChunksPerThread items: on a machine where other processes compete for the cores, a thread
 * that is descheduled holds up the call only for the chunk it is running, not for a fixed share
 * of the work, and the last chunks are small, so the threads finish together (with 8 equal
 * chunks, one per ~100 us of a 4096 x 4096 NF4 product, a thread idled ~50 us per call at the
 * end); the caller returns as soon as every item is done, without waiting for workers that never
 * got to run. The first chunks are large because each chunk restarts a thread's stream through
 * memory (the hardware and software prefetches start cold): with kGuidedShare 2 instead of 1, one
 * token through 20 NF4 layers took 121 us a layer against 110 (AMD Zen 5, 2 threads, memory
 * reading ~100 GB/s; medians of 10 rounds with the libraries rotated; alike at ~45-55 GB/s).
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
 *
 * A call may name the memory the next one will stream (NextStream: the next layer, learned by
 * call_order.h). Between two layers of a model the caller runs Python for 7-13 us while memory
 * idles; a worker that has finished its chunks spends that time prefetching the part of the next
 * layer its first chunk will read (up to kNextStreamBytes), so that the next call starts on
 * lines already in its cache. Measured on AMD Zen 5 (2 threads, one token through 20 NF4
 * 4096 x 4096 layers through lowbit.matmul_4bit): ~2 points more of the side-by-side read at
 * 50-80 GB/s (94 against 91 % at ~80).
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
/* The smallest chunk is grain / kChunksPerThread items: small enough that the threads finish
 * together, large enough that taking a chunk costs nothing. */
constexpr int64_t kChunksPerThread = 4;
/* Each chunk takes 1 / (kGuidedShare * threads) of the items left. */
constexpr int64_t kGuidedShare = 1;
/* The shared counter: job generation (low bits) in the top kGenerationBits bits, items taken
 * below. A late worker's compare-exchange then fails once a newer job is published. */
constexpr int kGenerationBits = 24;
constexpr int kItemBits = 64 - kGenerationBits;
constexpr uint64_t kItemMask = (uint64_t{1} << kItemBits) - 1;
/* How long a worker stays awake for the next job, and the caller for the last chunks, before
 * sleeping on a condition variable. */
constexpr std::chrono::microseconds kSpin{200};
/* What a worker prefetches of the next call's stream at most: more than one core's share of the
 * memory bandwidth brings in during a layer's Python (with a 20-us busy wait between layers,
 * 128 KiB and 2-4 MiB gained alike), and well within an L2. */
constexpr int64_t kNextStreamBytes = int64_t{512} << 10;
/* Between two checks for a new job, a worker prefetches this many bytes (~100 ns of reading). */
constexpr int64_t kNextStreamStep = 4096;
constexpr int64_t kLine = 64;

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

/* One parallel_for over [begin, begin + items) on `threads` threads. */
struct Job {
    RangeFn fn = nullptr;
    void *ctx = nullptr;
    int64_t begin = 0, items = 0, threads = 1, min_chunk = 1;
    NextStream next; /* for the workers to prefetch once their chunks are done */

    /* Chunk k of `threads` equal ones (the first items % threads one item longer). */
    Chunk equal_chunk(int64_t k) const {
        const int64_t base = items / threads, rem = items % threads;
        const int64_t lo = begin + base * k + std::min(k, rem);
        return Chunk{fn, ctx, lo, lo + base + (k < rem ? 1 : 0)};
    }
    /* Items of the guided chunk that starts `taken` items in. */
    int64_t guided_size(int64_t taken) const {
        const int64_t left = items - taken;
        return std::min(left, std::max(min_chunk, left / (kGuidedShare * threads)));
    }
};

/* Prefetches `share` (worker_share) into L2 a line at a time until it is done or ready(). */
template <class Ready>
void prefetch_share(const NextStream &share, Ready &&ready) {
    for (int r = 0; r < share.count; ++r) {
        const char *base = static_cast<const char *>(share.base[r]);
        for (int64_t step = 0; step < share.bytes[r]; step += kNextStreamStep) {
            if (ready()) return;
            for (int64_t line = step; line < std::min(share.bytes[r], step + kNextStreamStep); line += kLine) {
#if defined(__GNUC__) || defined(__clang__)
                __builtin_prefetch(base + line, 0, 2); /* never faults, wherever `base` points now */
#else
                (void)base;
#endif
            }
        }
    }
}

/* Runs equal chunks 1..threads-1 on short-lived threads (those that fail to start run here) and
 * chunk 0 here. */
void run_on_new_threads(const Job &job) {
    std::vector<std::thread> workers;
    try {
        workers.reserve(static_cast<size_t>(job.threads - 1));
    } catch (...) {
        for (int64_t k = 0; k < job.threads; ++k) job.equal_chunk(k)(); /* cannot even allocate */
        return;
    }
    for (int64_t k = 1; k < job.threads; ++k) {
        const Chunk c = job.equal_chunk(k);
        try {
            workers.emplace_back(c);
        } catch (...) {
            c(); /* thread could not start (resource limits): do this chunk here */
        }
    }
    job.equal_chunk(0)();
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
            done_items_.store(0, std::memory_order_relaxed);
            next_.store(generation << kItemBits, std::memory_order_release);
            generation_.store(generation, std::memory_order_release); /* last: spinning workers start */
        }
        wake_.notify_all();
        run_chunks(job, generation);
        const auto done = [&] { return done_items_.load(std::memory_order_acquire) == job.items; };
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
        const uint64_t tag = generation & ((uint64_t{1} << kGenerationBits) - 1);
        uint64_t next = next_.load(std::memory_order_acquire);
        for (;;) {
            const int64_t taken = static_cast<int64_t>(next & kItemMask);
            if ((next >> kItemBits) != tag || taken >= job.items) return;
            const int64_t size = job.guided_size(taken);
            if (!next_.compare_exchange_weak(next, next + static_cast<uint64_t>(size), std::memory_order_acq_rel))
                continue;
            Chunk{job.fn, job.ctx, job.begin + taken, job.begin + taken + size}();
            if (done_items_.fetch_add(size, std::memory_order_acq_rel) + size == job.items) {
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
            if (job.next.count > 0) prefetch_share(worker_share(job.next, index, job.threads, kNextStreamBytes), published);
        }
    }

    std::mutex busy_;  /* held by the caller for the whole call */
    std::mutex mutex_; /* guards everything below but the atomics */
    std::condition_variable wake_, done_;
    std::atomic<uint64_t> generation_{0};   /* written under mutex_, read by spinning workers too */
    Job job_;
    int64_t job_workers_ = 0;
    std::atomic<uint64_t> next_{0};         /* generation << kItemBits | items taken */
    std::atomic<int64_t> done_items_{0};    /* items of the current job finished */
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

NextStream worker_share(const NextStream &next, int64_t worker, int64_t threads, int64_t budget) {
    double left = 1.0; /* of each range, after the chunks taken before the worker's */
    for (int64_t k = 0; k < worker; ++k) left *= 1.0 - 1.0 / static_cast<double>(threads);
    int64_t total = 0;
    for (int r = 0; r < next.count; ++r) total += next.bytes[r];
    const double fraction = total > budget ? static_cast<double>(budget) / static_cast<double>(total) : 1.0;
    NextStream share;
    share.count = next.count;
    for (int r = 0; r < next.count; ++r) {
        const int64_t bytes = next.bytes[r];
        if (bytes <= 0) continue;
        const int64_t from = std::min(bytes, static_cast<int64_t>((1.0 - left) * static_cast<double>(bytes)));
        const auto past_line = static_cast<int64_t>((reinterpret_cast<uintptr_t>(next.base[r]) + static_cast<uintptr_t>(from)) %
                                                    static_cast<uintptr_t>(kLine));
        const int64_t line = from - past_line; /* the start of the line holding byte `from` */
        share.base[r] = static_cast<const char *>(next.base[r]) + line;
        share.bytes[r] = std::min(bytes - line, static_cast<int64_t>(fraction * static_cast<double>(bytes)) + (from - line));
    }
    return share;
}

void parallel_for_impl(int64_t begin, int64_t end, int num_threads, int64_t grain, RangeFn fn,
                       void *ctx, const NextStream *next) {
    if (end <= begin) return;
    const int64_t items = end - begin;
    if (grain < 1) grain = 1;

    int64_t threads = 1;
    if (num_threads > 1) threads = std::min<int64_t>({int64_t{num_threads}, items / grain, kMaxThreads});
    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.begin = begin;
    job.items = items;
    job.threads = std::max<int64_t>(threads, 1);
    if (job.threads == 1) {
        job.equal_chunk(0)();
        return;
    }
    job.min_chunk = std::max<int64_t>(1, grain / kChunksPerThread);
    if (next != nullptr) job.next = *next;
    Pool *p = pool();
    if (items <= static_cast<int64_t>(kItemMask) && p != nullptr && p->run(job, threads - 1)) return;
    run_on_new_threads(job);
}

} // namespace cpu
} // namespace lowbit
