/* huge_pages.h -- asking the OS to back a buffer that kernels stream with huge pages.
 *
 * A decode step reads every weight once, front to back: through 4 KiB pages that is a page walk
 * and a TLB entry every 4 KiB, which also push out the entries and lines the Python between two
 * layers needs. A 150-layer 4096 x 4096 NF4 stack through lowbit.matmul_4bit took 88 ms a token in
 * 4 KiB pages and 84 ms with the interior 2 MiB pages huge (medians of 4 alternating runs, Intel
 * SPR, transparent huge pages in "madvise" mode); the same kernels with no Python between layers
 * were no faster, so the gain is in the calls around them. Compiled once (baseline ISA).
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
