/* paged.cuh -- managed-memory helpers (paged.cu), called by capi.cu. */
#ifndef LOWBIT_CUDA_PAGED_CUH
#define LOWBIT_CUDA_PAGED_CUH

#include <stddef.h>

#include "compat.cuh"

namespace lowbit {
namespace gpu {

cudaError_t managed_supported(int device, int *supported);
cudaError_t managed_alloc(size_t bytes, void **out);
cudaError_t managed_free(void *ptr);
/* device < 0: to the host. */
cudaError_t prefetch(const void *ptr, size_t bytes, int device, cudaStream_t stream);

} // namespace gpu
} // namespace lowbit

#endif /* LOWBIT_CUDA_PAGED_CUH */
