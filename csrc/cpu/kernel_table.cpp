/* kernel_table.cpp -- the entry points of this ISA build, for dispatch.cpp (compiled per ISA). */
#include "cpu_kernels.h"
#include "dispatch.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

extern const KernelTable kKernels;
const KernelTable kKernels = {quantize_4bit, dequantize_4bit, quantize_blockwise, dequantize_blockwise,
                              gemv_4bit,
                              int8_linear_matmul, int8_vectorwise_quant, int8_colwise_quant,
                              int8_vectorwise_dequant, int8_mm_dequant,
                              optimizer_update_32bit, optimizer_update_8bit_blockwise,
                              interleave_4bit, matmul_4bit_interleaved};

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
