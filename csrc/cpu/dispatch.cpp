/* dispatch.cpp -- run-time choice of the kernels' ISA build (see dispatch.h).
 *
 * CMake defines LOWBIT_CPU_HAVE_AVX2 / LOWBIT_CPU_HAVE_AVX512 for the builds it compiled (x86-64
 * with GCC or Clang only); every other target has the scalar build alone.
 */
#include "dispatch.h"

#include <atomic>

#if defined(LOWBIT_CPU_HAVE_AVX2) || defined(LOWBIT_CPU_HAVE_AVX512)
#include <cpuid.h>
#endif
#if defined(LOWBIT_CPU_HAVE_AVX512) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lowbit {
namespace cpu {

namespace scalar {
extern const KernelTable kKernels;
}
#if defined(LOWBIT_CPU_HAVE_AVX2)
namespace avx2 {
extern const KernelTable kKernels;
}
#endif
#if defined(LOWBIT_CPU_HAVE_AVX512)
namespace avx512 {
extern const KernelTable kKernels;
}
#endif

namespace {

const KernelTable *table_of(int32_t isa) {
    switch (isa) {
    case kIsaScalar: return &scalar::kKernels;
#if defined(LOWBIT_CPU_HAVE_AVX2)
    case kIsaAvx2: return &avx2::kKernels;
#endif
#if defined(LOWBIT_CPU_HAVE_AVX512)
    case kIsaAvx512: return &avx512::kKernels;
#endif
    default: return nullptr;
    }
}

#if defined(LOWBIT_CPU_HAVE_AVX2) || defined(LOWBIT_CPU_HAVE_AVX512)
/* CPUID.1:ECX.F16C[bit 29] (read directly: older Clang's __builtin_cpu_supports lacks "f16c"; the
 * OS support it needs is that of AVX, checked with avx2). */
bool has_f16c() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
}
#endif

#if defined(LOWBIT_CPU_HAVE_AVX2)
/* CPUID.(EAX=7,ECX=1):EAX.AVX_VNNI[bit 4] (the OS support it needs is that of AVX, checked with avx2). */
bool has_avx_vnni() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 4)) != 0;
}
#endif

#if defined(LOWBIT_CPU_HAVE_AVX512)
/* CPUID.(EAX=7,ECX=0):ECX.AVX512_VNNI[bit 11] (the OS support it needs is that of AVX-512). */
bool has_avx512_vnni() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 11)) != 0;
}

/* AMX-BF16 with AMX-TILE (CPUID.(7,0):EDX[22], [24]) and AVX512-BF16 (CPUID.(7,1):EAX[5]), the OS
 * saving the tile state (XCR0 bits 17-18), and Linux's per-process permission for the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM, granted once for every thread). Other systems: not used. */
bool has_amx_bf16() {
#if defined(__linux__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || (edx & (1u << 22)) == 0 || (edx & (1u << 24)) == 0)
        return false;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || (eax & (1u << 5)) == 0) return false;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
}
#endif

/* What the CPU and OS can run. The avx512 build is also compiled with AVX2, FMA and F16C. */
bool cpu_can_run(int32_t isa) {
#if defined(LOWBIT_CPU_HAVE_AVX2) || defined(LOWBIT_CPU_HAVE_AVX512)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    switch (isa) {
    case kIsaScalar: return true;
    case kIsaAvx2: return avx2;
    case kIsaAvx512:
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    default: return false;
    }
#else
    return isa == kIsaScalar;
#endif
}

int32_t best_isa() {
    for (int32_t isa = kNumIsas - 1; isa > kIsaScalar; --isa)
        if (isa_supported(isa)) return isa;
    return kIsaScalar;
}

/* -1 until first use; then the ISA in use. Relaxed is enough: tables are constants. */
std::atomic<int32_t> g_isa{-1};
/* The mask of set_cpu_features. */
std::atomic<uint32_t> g_feature_mask{kAllFeatures};

} // namespace

bool isa_supported(int32_t isa) { return table_of(isa) != nullptr && cpu_can_run(isa); }

int32_t current_isa() {
    int32_t isa = g_isa.load(std::memory_order_relaxed);
    if (isa < 0) { /* first use; a concurrent set_isa() wins */
        int32_t unset = -1;
        isa = best_isa();
        if (!g_isa.compare_exchange_strong(unset, isa, std::memory_order_relaxed)) isa = unset;
    }
    return isa;
}

bool set_isa(int32_t isa) {
    if (!isa_supported(isa)) return false;
    g_isa.store(isa, std::memory_order_relaxed);
    return true;
}

const KernelTable &kernels() { return *table_of(current_isa()); }

uint32_t cpu_features_supported() {
    uint32_t features = 0;
#if defined(LOWBIT_CPU_HAVE_AVX2)
    if (isa_supported(kIsaAvx2) && has_avx_vnni()) features |= kFeatureAvxVnni;
#endif
#if defined(LOWBIT_CPU_HAVE_AVX512)
    if (isa_supported(kIsaAvx512) && has_avx512_vnni()) features |= kFeatureAvx512Vnni;
    if (isa_supported(kIsaAvx512) && has_amx_bf16()) features |= kFeatureAmxBf16;
#endif
    return features;
}

uint32_t cpu_features() {
    static const uint32_t supported = cpu_features_supported();
    return supported & g_feature_mask.load(std::memory_order_relaxed);
}

void set_cpu_features(uint32_t mask) { g_feature_mask.store(mask & kAllFeatures, std::memory_order_relaxed); }

} // namespace cpu
} // namespace lowbit
