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
};

/* True when `isa` is compiled into this library and this CPU/OS can execute it. */
bool isa_supported(int32_t isa);
/* The ISA in use. */
int32_t current_isa();
/* Use `isa` from now on; false (and no change) when !isa_supported(isa). */
bool set_isa(int32_t isa);
/* The kernels of the ISA in use. */
const KernelTable &kernels();

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_DISPATCH_H */
