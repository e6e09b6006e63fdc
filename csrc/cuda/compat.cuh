/* compat.cuh -- the one place where CUDA and HIP differ for the csrc/cuda sources.
 *
 * The kernels are written against the CUDA runtime names; a HIP build (hipcc / clang -x hip,
 * with -DLOWBIT_HIP=1 from csrc/cuda/CMakeLists.txt) maps each name used here to its HIP twin.
 * Nothing else in csrc/cuda may include a runtime header directly.
 *
 * Also defined here:
 *  - LOWBIT_WARP_SIZE (device code only): 32 on NVIDIA and on RDNA (gfx10xx/gfx11xx/gfx12xx), 64
 *    on GCN/CDNA (gfx9xx: gfx906, gfx908, gfx90a, gfx942, gfx950). A compile-time constant per
 *    target from the compiler's family macros (__GFX9__, ...), not from __AMDGCN_WAVEFRONT_SIZE,
 *    which ROCm 6.4+ compilers deprecate (a warning, an error under -Werror). Host code never uses
 *    it: a HIP fat binary mixes wave32 and wave64 targets, so launch shapes are chosen without it
 *    (kernels reduce over 32-lane groups, which are whole warps on NVIDIA/RDNA and half-wavefronts
 *    on CDNA; an RDNA build forced to wave64 would still be correct, only the groups are halves).
 *  - lb_shfl_xor: butterfly shuffle over a power-of-two group of lanes <= 32 (CUDA needs the
 *    *_sync form with a member mask, ROCm 5.2 only has the mask-less form).
 *  - LOWBIT_LAUNCH(grid, block, stream, kernel)(args): the <<<>>> launch, spelled so that the
 *    host emulation (csrc/cuda/emu, -DLOWBIT_EMULATION=1, tests only) can run the same sources on
 *    the CPU; LOWBIT_CHECK_ALIGNED lets the emulation verify vector-access alignment.
 *  - lb_sqrtf (correctly rounded on every toolchain).
 *  - bf16: ROCm 5.2 has no hip_bf16.h, so no bf16 type from either runtime is used anywhere:
 *    fp16/bf16 data are raw uint16_t bits converted with lowbit_formats.h's helpers (exact,
 *    round-to-nearest-even, the CPU's bits). NVIDIA sm_80+ paths may use the hardware
 *    conversion where only a tolerance is promised (gemv output).
 */
#ifndef LOWBIT_CUDA_COMPAT_CUH
#define LOWBIT_CUDA_COMPAT_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(LOWBIT_EMULATION) && LOWBIT_EMULATION
/* Host emulation (csrc/cuda/emu): the kernels run on the CPU, one CTA at a time, its threads as
 * fibers. Only for tests: it executes the parallel decomposition without a GPU. */
#include "emu/emu_runtime.h"

#define LOWBIT_PLATFORM_NAME "emulation"
#define LOWBIT_RUNTIME_VERSION_NAME "emulated runtime"
#define LOWBIT_LAUNCH(grid, block, stream, ...) ::lowbit::emu::Launch(::lowbit::emu::dim3(grid), ::lowbit::emu::dim3(block), __VA_ARGS__)
/* A GPU faults on a misaligned vector access; the host would not: the emulation checks. */
#define LOWBIT_CHECK_ALIGNED(pointer, bytes) ::lowbit::emu::check_aligned((pointer), (bytes))

#elif defined(LOWBIT_HIP) && LOWBIT_HIP
#include <hip/hip_runtime.h>

#define LOWBIT_PLATFORM_NAME "hip"
#define LOWBIT_RUNTIME_VERSION_NAME "HIP runtime"

typedef hipError_t cudaError_t;
typedef hipStream_t cudaStream_t;
#define cudaSuccess hipSuccess
#define cudaErrorInvalidValue hipErrorInvalidValue
#define cudaGetLastError hipGetLastError
#define cudaGetErrorString hipGetErrorString
#define cudaGetErrorName hipGetErrorName
#define cudaGetDevice hipGetDevice
#define cudaSetDevice hipSetDevice
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDevAttrConcurrentManagedAccess hipDeviceAttributeConcurrentManagedAccess
#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define cudaRuntimeGetVersion hipRuntimeGetVersion
#define cudaDriverGetVersion hipDriverGetVersion
#define cudaFuncGetAttributes hipFuncGetAttributes
typedef hipFuncAttributes cudaFuncAttributes;
#define cudaMallocManaged hipMallocManaged
#define cudaMemAttachGlobal hipMemAttachGlobal
#define cudaFree hipFree
#define cudaMemsetAsync hipMemsetAsync
#define cudaCpuDeviceId hipCpuDeviceId

#define LOWBIT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#define LOWBIT_CHECK_ALIGNED(pointer, bytes) ((void)0)

#else /* CUDA (nvcc, or clang -x cuda) */
#include <cuda_runtime.h>

#define LOWBIT_PLATFORM_NAME "cuda"
#define LOWBIT_RUNTIME_VERSION_NAME "CUDA runtime"
#define LOWBIT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#define LOWBIT_CHECK_ALIGNED(pointer, bytes) ((void)0)
#endif

/* lowbit_formats.h picks __host__ __device__ from __CUDACC__ / __HIPCC__; the runtime header
 * above must come first so that those keywords exist. */
#include "lowbit_device.h"
#include "lowbit_formats.h"

/* ---- warp size (device passes only) ------------------------------------------------------- */
#if defined(__HIP_DEVICE_COMPILE__)
#if defined(__GFX10__) || defined(__GFX11__) || defined(__GFX12__)
#define LOWBIT_WARP_SIZE 32
#elif defined(__GFX9__) || defined(__GFX8__)
#define LOWBIT_WARP_SIZE 64
#else
#error "lowbit: unknown AMD GPU family; add its wavefront size to csrc/cuda/compat.cuh"
#endif
#elif defined(__CUDA_ARCH__)
#define LOWBIT_WARP_SIZE 32
#endif

/* True in the device pass for NVIDIA sm_80 or newer (hardware bf16 conversion). */
#if defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__) && __CUDA_ARCH__ >= 800
#define LOWBIT_SM80 1
#else
#define LOWBIT_SM80 0
#endif
#if defined(LOWBIT_WARP_SIZE)
static_assert(LOWBIT_WARP_SIZE % 32 == 0, "32-lane groups (kLaneGroup) must tile a warp");
#endif

namespace lowbit {
namespace gpu {

/* Lanes that cooperate through shuffles: at most 32, a whole warp on NVIDIA and RDNA, half a
 * wavefront on CDNA. Group sizes used with lb_shfl_xor are powers of two <= kLaneGroup. */
constexpr int kLaneGroup = 32;

template <class T>
__device__ __forceinline__ T lb_shfl_xor(T v, int lane_mask) {
#if defined(LOWBIT_HIP) && LOWBIT_HIP
    return __shfl_xor(v, lane_mask);
#else
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

/* Correctly rounded float32 square root on every toolchain (sqrtf is not, on two of them):
 *  - clang -x cuda maps sqrtf to libdevice's __nv_sqrtf, which is sqrt.approx.f32 unless
 *    __CUDA_PREC_SQRT is reflected; __fsqrt_rn is sqrt.rn.f32 with nvcc and clang alike;
 *  - ROCm 5.x (clang 15) compiles sqrtf to a bare v_sqrt_f32 (1 ulp): fmt::sqrt_rn_from_approx
 *    (lowbit_device.h) corrects it with two FMA residuals, as LLVM 17+ does itself. */
__device__ __forceinline__ float lb_sqrtf(float x) {
#if defined(LOWBIT_HIP) && LOWBIT_HIP
    return fmt::sqrt_rn_from_approx(x, [](float v) { return __builtin_sqrtf(v); });
#elif defined(LOWBIT_EMULATION) && LOWBIT_EMULATION
    return sqrtf(x); /* IEEE on the host */
#else
    return __fsqrt_rn(x);
#endif
}

} // namespace gpu
} // namespace lowbit

#endif /* LOWBIT_CUDA_COMPAT_CUH */
