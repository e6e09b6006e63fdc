/* lut8_cache.h -- the 65536-entry lookup of the 8-bit blockwise quantizer, cached per code.
 *
 * Building the table (fmt::build_lut8) costs ~65536 float divisions; nearly every call uses
 * the same code (the signed dynamic map), so the last few tables are kept, keyed by the exact
 * bits of the 256 code values. The cache copies a table into caller-owned memory under a lock,
 * so no table is ever shared across threads while it could be evicted. Compiled once
 * (baseline ISA); safe to call from any thread.
 */
#ifndef LOWBIT_CPU_LUT8_CACHE_H
#define LOWBIT_CPU_LUT8_CACHE_H

#include <stdint.h>

namespace lowbit {
namespace cpu {

/* Writes the lookup for `code256` (256 floats) into lut_out (65536 bytes). Never fails: if the
 * cache cannot allocate, the table is built directly into lut_out. */
void lut8_get(const float *code256, uint8_t *lut_out);

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_LUT8_CACHE_H */
