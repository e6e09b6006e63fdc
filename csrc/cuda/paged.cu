/* paged.cu -- managed ("paged") memory for paged optimizers: allocation, release, prefetch.
 *
 * A paged optimizer keeps its state in memory allocated with cudaMallocManaged: the GPU uses it in
 * place, and under memory pressure the driver evicts pages to host memory instead of failing.
 * Prefetching moves the pages to the GPU (before an optimizer step) or back to the host
 * asynchronously on a stream, so the first kernel does not fault them in one by one.
 * No kernels here: these are runtime calls, kept beside the kernels so that Python reaches them
 * through the same library (CUDA and HIP alike) instead of locating the runtime torch loaded.
 */
#include "kernels.cuh"
#include "paged.cuh"

namespace lowbit {
namespace gpu {

cudaError_t managed_supported(int device, int *supported) {
    return cudaDeviceGetAttribute(supported, cudaDevAttrConcurrentManagedAccess, device);
}

cudaError_t managed_alloc(size_t bytes, void **out) {
    return cudaMallocManaged(out, bytes == 0 ? 1 : bytes, cudaMemAttachGlobal);
}

cudaError_t managed_free(void *ptr) { return cudaFree(ptr); }

cudaError_t prefetch(const void *ptr, size_t bytes, int device, cudaStream_t stream) {
#if defined(LOWBIT_HIP) && LOWBIT_HIP
    return hipMemPrefetchAsync(ptr, bytes, device < 0 ? hipCpuDeviceId : device, stream);
#elif CUDART_VERSION >= 13000
    /* CUDA 13 removed the (int dstDevice) overload: the destination is a cudaMemLocation. */
    cudaMemLocation location{};
    location.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    location.id = device < 0 ? 0 : device;
    return cudaMemPrefetchAsync(ptr, bytes, location, 0u, stream);
#else
    return cudaMemPrefetchAsync(ptr, bytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

} // namespace gpu
} // namespace lowbit
