/* kernel_table.cpp -- the entry points of this ISA build, for dispatch.cpp (compiled per ISA). */
#include "cpu_kernels.h"
#include "dispatch.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

extern const KernelTable kKernels;
const KernelTable kKernels = {quantize_4bit, dequantize_4bit, quantize_blockwise, dequantize_blockwise,
                              gemv_4bit};

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
