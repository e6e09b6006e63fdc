/* emu_runtime.cpp -- the fiber scheduler behind emu_runtime.h (see there for the model).
 *
 * A fiber is entered the first time with swapcontext (ucontext gives it its own stack); every later
 * switch is _setjmp/_longjmp, which, unlike swapcontext, does not save and restore the signal mask
 * with a system call -- the emulation makes millions of switches. (Jumping between stacks is what
 * user-space coroutine libraries do on glibc; _FORTIFY_SOURCE's longjmp check must be off.) */
#undef _FORTIFY_SOURCE
#include "emu_runtime.h"

#include <setjmp.h>
#include <stdio.h>
#include <ucontext.h>

#include <algorithm>
#include <mutex>
#include <random>
#include <vector>

/* Bounds of the lowbit_emu_shared section (every __shared__ variable of this library), defined
 * by the linker; weak: a library without shared variables has no such section. */
extern "C" char __start_lowbit_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_lowbit_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace lowbit {
namespace emu {

dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kWarp = 32;

enum class State { kRunnable, kBlockWait, kWarpWait, kDone };

struct Fiber {
    ucontext_t context;
    jmp_buf resume;
    char *stack = nullptr;
    State state = State::kRunnable;
    bool started = false;
    unsigned tid = 0;
};

struct Warp {
    unsigned arrived = 0;
    uint64_t slot[kWarp];
};

std::mutex g_launch_mutex;
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
ucontext_t g_scheduler;
jmp_buf g_scheduler_jump;
Fiber *g_current = nullptr;
const std::function<void()> *g_body = nullptr;
unsigned g_block_arrived = 0;
int g_and_accumulator = 1;
int g_and_result = 1;
int g_launch_error = 0;
bool g_index_order = false; /* LOWBIT_EMU_SCHEDULE=index: the old schedule, no poison */
std::vector<unsigned> g_order;
constexpr unsigned char kPoison = 0xFF;

[[noreturn]] void fail(const char *message) {
    fprintf(stderr, "lowbit GPU emulation: %s (block %u, thread %u)\n", message, g_block_idx.x,
            g_current ? g_current->tid : 0u);
    abort();
}

void yield() {
    if (_setjmp(g_current->resume) == 0) _longjmp(g_scheduler_jump, 1);
}

void trampoline() {
    (*g_body)();
    g_current->state = State::kDone;
    _longjmp(g_scheduler_jump, 1); /* never resumed */
}

void resume(Fiber &f) {
    g_current = &f;
    g_thread_idx = dim3(f.tid, 0, 0);
    if (_setjmp(g_scheduler_jump) != 0) return; /* the fiber yielded or finished */
    if (!f.started) {
        f.started = true;
        swapcontext(&g_scheduler, &f.context);
        fail("fiber returned through its context");
    }
    _longjmp(f.resume, 1);
}

/* The order fibers run in during phase `phase` of the current CTA: by index, reversed or
 * shuffled, varied across phases and CTAs (deterministic: seeded by both numbers). */
void order_for_phase(unsigned threads, unsigned phase) {
    g_order.resize(threads);
    for (unsigned t = 0; t < threads; ++t) g_order[t] = t;
    if (g_index_order) return;
    switch ((g_block_idx.x + phase) % 3) {
    case 0: break;
    case 1: std::reverse(g_order.begin(), g_order.end()); break;
    default: {
        std::mt19937 rng(g_block_idx.x * 7919u + phase);
        std::shuffle(g_order.begin(), g_order.end(), rng);
    }
    }
}

void poison_shared() {
    if (g_index_order || __start_lowbit_emu_shared == nullptr) return;
    memset(__start_lowbit_emu_shared, kPoison, static_cast<size_t>(__stop_lowbit_emu_shared - __start_lowbit_emu_shared));
}

void run_block(unsigned threads) {
    poison_shared();
    g_fibers.resize(threads);
    g_warps.assign((threads + kWarp - 1) / kWarp, Warp{});
    g_block_arrived = 0;
    g_and_accumulator = 1;
    for (unsigned t = 0; t < threads; ++t) {
        Fiber &f = g_fibers[t];
        if (f.stack == nullptr) f.stack = static_cast<char *>(malloc(kStackBytes));
        if (f.stack == nullptr) fail("out of memory for fiber stacks");
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = nullptr;
        makecontext(&f.context, trampoline, 0);
        f.state = State::kRunnable;
        f.started = false;
        f.tid = t;
    }
    for (unsigned phase = 0;; ++phase) {
        bool ran = false;
        unsigned alive = 0;
        order_for_phase(threads, phase);
        for (unsigned t : g_order) {
            Fiber &f = g_fibers[t];
            if (f.state == State::kRunnable) {
                resume(f);
                ran = true;
            }
            if (f.state != State::kDone) ++alive;
        }
        if (alive == 0) break;
        bool released = false;
        if (g_block_arrived > 0 && g_block_arrived == alive) { /* every live thread is at __syncthreads */
            g_and_result = g_and_accumulator;
            g_and_accumulator = 1;
            g_block_arrived = 0;
            for (Fiber &f : g_fibers)
                if (f.state == State::kBlockWait) f.state = State::kRunnable;
            released = true;
        }
        for (size_t w = 0; w < g_warps.size(); ++w) {
            Warp &warp = g_warps[w];
            if (warp.arrived == 0) continue;
            const unsigned first = static_cast<unsigned>(w) * kWarp;
            unsigned lanes = 0, waiting = 0;
            for (unsigned t = first; t < first + kWarp && t < threads; ++t) {
                ++lanes;
                waiting += g_fibers[t].state == State::kWarpWait ? 1 : 0;
            }
            if (lanes != kWarp) fail("shuffle in a warp with fewer than 32 threads");
            if (waiting == kWarp) {
                warp.arrived = 0;
                for (unsigned t = first; t < first + kWarp; ++t) g_fibers[t].state = State::kRunnable;
                released = true;
            }
        }
        if (!ran && !released) {
            for (Fiber &f : g_fibers)
                if (f.state == State::kWarpWait) {
                    g_current = &f;
                    fail("deadlock: a shuffle waits for lanes that exited or wait at __syncthreads");
                }
            fail("deadlock at __syncthreads");
        }
    }
}

} // namespace

void run_grid(dim3 grid, dim3 block, const std::function<void()> &body) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    if (grid.x == 0 || block.x == 0 || block.x > 1024 || grid.y != 1 || block.y != 1) {
        g_launch_error = cudaErrorInvalidConfiguration;
        return;
    }
    const char *schedule = getenv("LOWBIT_EMU_SCHEDULE");
    g_index_order = schedule != nullptr && strcmp(schedule, "index") == 0;
    /* LOWBIT_EMU_LAST_CTAS=k runs only the grid's last k CTAs: the tests of the kernels' 64-bit
     * index math launch over more than 2^31 elements (sparse buffers) and check only the end. */
    const char *last = getenv("LOWBIT_EMU_LAST_CTAS");
    const unsigned long keep = last != nullptr ? strtoul(last, nullptr, 10) : 0;
    const unsigned first = (keep > 0 && keep < grid.x) ? grid.x - static_cast<unsigned>(keep) : 0;
    g_body = &body;
    g_grid_dim = grid;
    g_block_dim = block;
    for (unsigned b = first; b < grid.x; ++b) {
        g_block_idx = dim3(b, 0, 0);
        run_block(block.x);
    }
    g_current = nullptr;
}

void sync_block() {
    g_current->state = State::kBlockWait;
    ++g_block_arrived;
    yield();
}

int sync_block_and(int predicate) {
    g_and_accumulator &= predicate != 0 ? 1 : 0;
    sync_block();
    return g_and_result;
}

uint64_t warp_exchange(uint64_t value, int lane_mask) {
    const unsigned tid = g_current->tid;
    Warp &warp = g_warps[tid / kWarp];
    const unsigned lane = tid % kWarp;
    if (lane_mask < 0 || static_cast<unsigned>(lane_mask) >= kWarp) fail("shuffle lane mask out of range");
    warp.slot[lane] = value;
    g_current->state = State::kWarpWait;
    ++warp.arrived;
    yield(); /* every lane has written its slot */
    const uint64_t result = warp.slot[lane ^ static_cast<unsigned>(lane_mask)];
    g_current->state = State::kWarpWait;
    ++warp.arrived;
    yield(); /* every lane has read: the slots may be reused */
    return result;
}

void check_aligned(const void *pointer, int bytes) {
    if (reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) != 0) {
        char message[96];
        snprintf(message, sizeof message, "misaligned %d-byte vector access at %p", bytes, pointer);
        fail(message);
    }
}

void set_launch_error(int error) { g_launch_error = error; }

int take_launch_error() {
    const int error = g_launch_error;
    g_launch_error = 0;
    return error;
}

} // namespace emu
} // namespace lowbit
