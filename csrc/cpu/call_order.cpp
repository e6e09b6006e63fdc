/* call_order.cpp -- see call_order.h.
 *
 * A direct-mapped table per thread (a thread's products run in its own order; no locks): kSlots
 * keys, far more than a model's quantized layers (~560 in a 70B Llama). Two keys that share a
 * slot take turns, costing only their hints.
 */
#include "call_order.h"

#include <memory>
#include <new>

namespace lowbit {
namespace cpu {

namespace {

constexpr int kSlotBits = 10;
constexpr uint64_t kSlots = uint64_t{1} << kSlotBits;

struct Order {
    struct Slot {
        const void *key = nullptr;
        NextStream next;
    };
    const void *last = nullptr;
    Slot slots[kSlots];

    /* Weights are page- or huge-page-aligned: a multiplicative hash spreads the high bits. */
    Slot &slot(const void *key) {
        return slots[(reinterpret_cast<uintptr_t>(key) * 0x9E3779B97F4A7C15ull) >> (64 - kSlotBits)];
    }
};

thread_local std::unique_ptr<Order> t_order;

} // namespace

NextStream follow(const void *key, const NextStream &stream) {
    if (!t_order) {
        t_order.reset(new (std::nothrow) Order());
        if (!t_order) return NextStream{};
    }
    Order &order = *t_order;
    if (order.last != nullptr) { /* key itself too: a layer called in a loop streams itself next */
        Order::Slot &previous = order.slot(order.last);
        previous.key = order.last;
        previous.next = stream;
    }
    order.last = key;
    const Order::Slot &mine = order.slot(key);
    return mine.key == key ? mine.next : NextStream{};
}

} // namespace cpu
} // namespace lowbit
