/* Atomic helpers for fastlb's shared memory (health bitmap, counters, source table).
 *
 * Owner: the Cython core. Every access to a word that another process may write goes through
 * these; plain loads/stores are only used on process-private memory. GCC/Clang __atomic builtins,
 * lock-free on every 64-bit target we build for (static-asserted below).
 */
#ifndef FASTLB_ATOMIC_H
#define FASTLB_ATOMIC_H
#include <stdint.h>

_Static_assert(__atomic_always_lock_free(sizeof(uint64_t), 0), "64-bit atomics must be lock-free");

static inline uint64_t flb_load_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t flb_fetch_or(uint64_t *p, uint64_t v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
static inline uint64_t flb_fetch_and(uint64_t *p, uint64_t v) { return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
static inline uint64_t flb_add_rel(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELEASE); }

/* Counters: one writer per word (its worker), readers elsewhere. Relaxed is enough: readers
 * want a recent, untorn value, not ordering with other memory. */
static inline int64_t flb_load_relaxed_i64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void flb_add_relaxed_i64(int64_t *p, int64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
/* Zeroing (Counters.zero): done by the supervisor only for words no process writes any more
 * (a dead worker's block, a freed slot), so a store is enough; atomic so readers see no tear. */
static inline void flb_store_relaxed_i64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* Test-only: the non-atomic read-modify-write the bitmap must NOT use; it lets a test prove
 * that its lost-update check really detects lost updates. */
static inline void flb_racy_or(uint64_t *p, uint64_t v) {
    volatile uint64_t *q = p; uint64_t x = *q; *q = x | v;
}
static inline void flb_racy_and(uint64_t *p, uint64_t v) {
    volatile uint64_t *q = p; uint64_t x = *q; *q = x & v;
}

/* Source table (core/srclimit.pxi). An entry is two words: ``state`` (key << 16 | concurrent
 * connections) and ``tat`` (the rate's theoretical arrival time). Every change of either is a
 * compare-and-swap, so no update is lost between workers.
 *  - CAS is acq_rel on success: acquire so that a process pinning an entry (conns + 1) then
 *    reads the ``tat`` the previous pinner left; release so that a claim (a new key) is seen
 *    whole. On failure acquire: the value handed back is then re-examined.
 *  - The decrement that releases a connection is a release: it orders this process's earlier
 *    ``tat`` update before the ``conns`` drop, so a process that loads the state with acquire
 *    and sees conns == 0 (the eviction check) also sees that ``tat``. */
static inline int flb_cas_u64(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint64_t flb_sub_rel(uint64_t *p, uint64_t v) { return __atomic_sub_fetch(p, v, __ATOMIC_RELEASE); }
/* Test-only: a plain store where a CAS belongs (the source table's racy twin). */
static inline void flb_racy_store(uint64_t *p, uint64_t v) { volatile uint64_t *q = p; *q = v; }
#endif
