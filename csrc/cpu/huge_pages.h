/* huge_pages.h -- asking the OS to back a buffer that kernels stream with huge pages.
 *
 * A decode step reads every weight once, front to back, at the memory's full rate: through 4 KiB
 * pages that is a page walk every 4 KiB, and the walks' own cache and TLB traffic costs ~10% of
 * the stream (a 150-layer 4096 x 4096 NF4 stack through Python: 76 ms in 4 KiB pages, 69 ms with
 * 2 MiB ones, measured on Intel SPR with the kernel's transparent huge pages in "madvise" mode).
 * Compiled once (baseline ISA).
 */
#ifndef LOWBIT_CPU_HUGE_PAGES_H
#define LOWBIT_CPU_HUGE_PAGES_H

#include <stddef.h>

namespace lowbit {
namespace cpu {

/* Advises (Linux: madvise MADV_HUGEPAGE) that the whole 2 MiB pages inside [data, data + bytes)
 * be backed by huge pages: pages not yet touched get one when first written, the others when the
 * kernel's khugepaged gets to them. Only a hint, about memory the caller owns: the contents do not
 * change, and where the OS has no such advice, or refuses it (THP disabled, a file mapping), this
 * does nothing. Buffers smaller than a huge page are left alone. */
void advise_huge_pages(void *data, size_t bytes);

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_HUGE_PAGES_H */
