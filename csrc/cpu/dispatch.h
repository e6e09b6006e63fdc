/* dispatch.h -- which ISA build of the CPU kernels runs: chosen at load, capped at run time.
 *
 * CMakeLists.txt compiles the kernel sources once per ISA into namespaces
 * lowbit::cpu::{scalar, avx2, avx512}; each build publishes its entry points as a KernelTable
 * (kernel_table.cpp). By default the best ISA that is compiled in and that this CPU and OS can run
 * is used (CPUID via __builtin_cpu_supports, which also checks XGETBV: the OS must save the
 * YMM/ZMM state); set_isa() switches to another runnable one (Python applies LOWBIT_CPU_ISA with
 * it). Compiled once, for the baseline ISA.
 */
#ifndef LOWBIT_CPU_DISPATCH_H
#define LOWBIT_CPU_DISPATCH_H

#include <stdint.h>

namespace lowbit {
namespace optim {
struct Params; /* csrc/common/lowbit_optim.h */
}
namespace cpu {

/* Same numbering as lowbit_isa in csrc/capi/lowbit_capi.h; higher is wider. */
enum Isa : int32_t { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kNumIsas = 3 };

/* The entry points of one ISA build (signatures: cpu_kernels.h). */
struct KernelTable {
    void (*quantize_4bit)(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                          int32_t quant_type, uint8_t *out, float *absmax, int num_threads);
    void (*dequantize_4bit)(int32_t dtype, const uint8_t *A, const float *absmax, int64_t n,
                            int64_t blocksize, const float *code, void *out, int num_threads);
    bool (*quantize_blockwise)(int32_t dtype, const float *code, const void *A, int64_t n,
                               int64_t blocksize, uint8_t *out, float *absmax, int num_threads);
    void (*dequantize_blockwise)(int32_t dtype, const float *code, const uint8_t *A,
                                 const float *absmax, int64_t n, int64_t blocksize, void *out,
                                 int num_threads);
    bool (*gemv_4bit)(int32_t a_dtype, const void *A, int64_t M, int64_t K, const uint8_t *B,
                      const float *absmax, const float *code, int64_t N, int64_t blocksize,
                      int32_t out_dtype, void *out, int num_threads);
    /* LLM.int8 (int8.cpp) */
    bool (*int8_linear_matmul)(const int8_t *A, int64_t M, int64_t K, const int8_t *B, int64_t N, int32_t *out,
                               int num_threads);
    void (*int8_vectorwise_quant)(int32_t dtype, const void *A, int64_t rows, int64_t cols, float threshold,
                                  int8_t *out, float *row_stats, uint8_t *flags, int num_threads);
    void (*int8_colwise_quant)(int32_t dtype, const void *A, int64_t rows, int64_t cols, float threshold,
                               int8_t *out, float *col_stats, int num_threads);
    void (*int8_vectorwise_dequant)(const int8_t *A, const float *stats, int64_t rows, int64_t cols, float scale,
                                    float *out, int num_threads);
    void (*int8_mm_dequant)(const int32_t *A, const float *row_stats, const float *col_stats, int64_t rows,
                            int64_t cols, float scale, const void *bias, int32_t bias_dtype, int32_t out_dtype,
                            void *out, int num_threads);
    /* Optimizers (optimizers.cpp; params: csrc/common/lowbit_optim.h). False: scratch allocation failed. */
    bool (*optimizer_update_32bit)(int32_t optimizer, int32_t dtype, const void *g, void *p, float *state1,
                                   float *state2, int64_t n, const optim::Params &params, float *unorm_vec,
                                   int num_threads);
    bool (*optimizer_update_8bit_blockwise)(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                            uint8_t *state1, uint8_t *state2, int64_t n,
                                            const optim::Params &params, const float *qmap1,
                                            const float *qmap2, float *absmax1, float *absmax2,
                                            int num_threads);
    /* The interleaved 4-bit layout (interleaved_4bit.cpp) */
    void (*interleave_4bit)(const uint8_t *B, const float *absmax, int64_t N, int64_t K, int64_t blocksize,
                            bool inverse, uint8_t *B_out, float *absmax_out, int num_threads);
    bool (*matmul_4bit_interleaved)(int32_t a_dtype, const void *A, int64_t M, int64_t K, const uint8_t *B,
                                    const float *absmax, const float *code, int64_t N, int64_t blocksize,
                                    const void *bias, int32_t bias_dtype, bool fast, int32_t out_dtype, void *out,
                                    int num_threads);
};

/* True when `isa` is compiled into this library and this CPU/OS can execute it. */
bool isa_supported(int32_t isa);
/* The ISA in use. */
int32_t current_isa();
/* Use `isa` from now on; false (and no change) when !isa_supported(isa). */
bool set_isa(int32_t isa);
/* The kernels of the ISA in use. */
const KernelTable &kernels();

/* Optional extensions that an ISA build uses where the CPU has them, beyond that ISA's baseline
 * (bit flags; same values as lowbit_cpu_feature in csrc/capi/lowbit_capi.h):
 *   kFeatureAvx512Vnni  vpdpbusd in the avx512 build's int8 GEMM (CPUID.(7,0):ECX[11]).
 *   kFeatureAmxBf16     AMX tiles (tdpbf16ps) and AVX512-BF16 conversions in the avx512 build's
 *                       product on the interleaved 4-bit layout, where bf16 rounding is allowed
 *                       (CPUID.(7,0):EDX[22,24], CPUID.(7,1):EAX[5], XCR0 tile state, and on
 *                       Linux the process's permission to use it, requested once).
 *   kFeatureAvxVnni     AVX-VNNI (vpdpwssd on ymm, VEX-encoded) in the avx2 build's fixed-point
 *                       product on the interleaved 4-bit layout (CPUID.(7,1):EAX[4]): CPUs without
 *                       AVX-512 that have it (Intel's since Alder Lake) skip a vpaddd per vpmaddwd.
 * A kernel asks cpu_features() at each call. */
enum Feature : uint32_t {
    kFeatureAvx512Vnni = 1u << 0,
    kFeatureAmxBf16 = 1u << 1,
    kFeatureAvxVnni = 1u << 2,
    kAllFeatures = kFeatureAvx512Vnni | kFeatureAmxBf16 | kFeatureAvxVnni,
};
/* The features this CPU and OS support (with the ISA build that uses them compiled in). */
uint32_t cpu_features_supported();
/* The features in use: the supported ones within the mask of set_cpu_features (default: all). */
uint32_t cpu_features();
/* Use only the features in `mask` from now on (process-wide; tests reach the fallback paths). */
void set_cpu_features(uint32_t mask);

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_DISPATCH_H */
