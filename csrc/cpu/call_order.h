/* call_order.h -- which product follows which, per calling thread.
 *
 * A model's layers run in the same order for every token, so the weights streamed after a
 * product are, from the second token on, those that followed it the last time. follow() records
 * that this product came after the previous one on this thread and returns what came after it
 * last time: the memory parallel_for's idle workers prefetch while Python runs between the
 * layers (parallel.h, NextStream). A wrong guess costs some reads, never a result.
 */
#ifndef LOWBIT_CPU_CALL_ORDER_H
#define LOWBIT_CPU_CALL_ORDER_H

#include <stdint.h>

#include "parallel.h"

namespace lowbit {
namespace cpu {

/* The product about to run streams `stream` (its ranges in the order it reads them); `key`
 * identifies it (its weight's address). Returns the stream of the product that followed it last
 * time on this thread, or an empty one. */
NextStream follow(const void *key, const NextStream &stream);

} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_CALL_ORDER_H */
