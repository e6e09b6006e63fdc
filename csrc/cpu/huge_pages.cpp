/* huge_pages.cpp -- see huge_pages.h. */
#include "huge_pages.h"

#include <stdint.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lowbit {
namespace cpu {

void advise_huge_pages(void *data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHugePage = uintptr_t{2} << 20; /* x86-64 and most aarch64 kernels */
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + bytes) & ~(kHugePage - 1); /* whole pages only */
    if (bytes >= kHugePage && last > first)
        (void)madvise(reinterpret_cast<void *>(first), last - first, MADV_HUGEPAGE); /* a hint: errors ignored */
#else
    (void)data;
    (void)bytes;
#endif
}

} // namespace cpu
} // namespace lowbit
