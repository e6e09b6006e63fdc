/* fp_env.h -- pins the floating-point environment the kernels need, for the current thread.
 *
 * Why: the formats are defined in IEEE float32 with round-to-nearest-even and subnormals kept
 * (the 4-bit quantizer divides by 1e-38f, a subnormal). A caller may have changed its thread's
 * state, e.g. torch.set_flush_denormal(True) sets FTZ/DAZ in MXCSR; with DAZ an all-zero block
 * would compute 0 * (1 / 0) = NaN. Worker threads start with the default state while the calling
 * thread keeps its own, so without this guard results could even depend on the thread count.
 *
 * FpEnvGuard saves the state, selects round-to-nearest with subnormals enabled, and restores the
 * caller's state when it goes out of scope. Used by every C ABI entry point and every worker.
 */
#ifndef LOWBIT_CPU_FP_ENV_H
#define LOWBIT_CPU_FP_ENV_H

#include <stdint.h>

#if defined(__SSE__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 1)
#include <xmmintrin.h>
#define LOWBIT_FP_ENV_MXCSR 1
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_FP_ENV_FPCR 1
#endif

namespace lowbit {
namespace cpu {

class FpEnvGuard {
  public:
#if defined(LOWBIT_FP_ENV_MXCSR)
    /* MXCSR: bit 15 FTZ, bit 6 DAZ, bits 13-14 rounding control (00 = nearest). */
    FpEnvGuard() : saved_(_mm_getcsr()) {
        const unsigned int wanted = saved_ & ~((1u << 15) | (1u << 6) | (3u << 13));
        if (wanted != saved_) _mm_setcsr(wanted);
    }
    ~FpEnvGuard() {
        if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
    }

  private:
    unsigned int saved_;
#elif defined(LOWBIT_FP_ENV_FPCR)
    /* FPCR: bit 24 FZ, bits 22-23 RMode (00 = nearest), bit 19 FZ16. */
    FpEnvGuard() : saved_(read()) {
        const uint64_t wanted = saved_ & ~((uint64_t{1} << 24) | (uint64_t{3} << 22) |
                                           (uint64_t{1} << 19));
        if (wanted != saved_) write(wanted);
    }
    ~FpEnvGuard() {
        if (read() != saved_) write(saved_);
    }

  private:
    static uint64_t read() {
        uint64_t v;
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
        return v;
    }
    static void write(uint64_t v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v)); }
    uint64_t saved_;
#else
    /* Other targets: assume the default IEEE environment. */
    FpEnvGuard() {}
#endif

  public:
    FpEnvGuard(const FpEnvGuard &) = delete;
    FpEnvGuard &operator=(const FpEnvGuard &) = delete;
};

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_FP_ENV_H */
