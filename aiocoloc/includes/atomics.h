/* C11 atomics for the shared-memory ring (see aiocoloc/_ring.pxd for the
 * ordering argument).  Positions and flags live in memory mapped by several
 * processes, so they are plain uint64_t/uint32_t cells in the layout and are
 * accessed through _Atomic-qualified casts.  On every platform we target,
 * lock-free 8-byte atomics have the same representation as the plain type.
 */
#ifndef AIOCOLOC_ATOMICS_H
#define AIOCOLOC_ATOMICS_H

#include <stdatomic.h>
#include <stdint.h>

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "aiocoloc needs lock-free 64-bit atomics");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "aiocoloc needs lock-free 32-bit atomics");

static inline uint64_t acl_load_acquire_u64(const volatile uint64_t *p) {
    return atomic_load_explicit((const volatile _Atomic uint64_t *)p, memory_order_acquire);
}

static inline void acl_store_release_u64(volatile uint64_t *p, uint64_t v) {
    atomic_store_explicit((volatile _Atomic uint64_t *)p, v, memory_order_release);
}

static inline uint64_t acl_load_relaxed_u64(const volatile uint64_t *p) {
    return atomic_load_explicit((const volatile _Atomic uint64_t *)p, memory_order_relaxed);
}

static inline uint32_t acl_load_acquire_u32(const volatile uint32_t *p) {
    return atomic_load_explicit((const volatile _Atomic uint32_t *)p, memory_order_acquire);
}

static inline void acl_store_release_u32(volatile uint32_t *p, uint32_t v) {
    atomic_store_explicit((volatile _Atomic uint32_t *)p, v, memory_order_release);
}

static inline void acl_store_relaxed_u32(volatile uint32_t *p, uint32_t v) {
    atomic_store_explicit((volatile _Atomic uint32_t *)p, v, memory_order_relaxed);
}

static inline uint32_t acl_exchange_u32(volatile uint32_t *p, uint32_t v) {
    return atomic_exchange_explicit((volatile _Atomic uint32_t *)p, v, memory_order_seq_cst);
}

static inline int acl_cas_u64(volatile uint64_t *p, uint64_t expected, uint64_t desired) {
    return atomic_compare_exchange_strong_explicit(
        (volatile _Atomic uint64_t *)p, &expected, desired,
        memory_order_seq_cst, memory_order_seq_cst);
}

static inline uint64_t acl_fetch_add_u64(volatile uint64_t *p, uint64_t v) {
    return atomic_fetch_add_explicit((volatile _Atomic uint64_t *)p, v, memory_order_seq_cst);
}

static inline int acl_cas_u32(volatile uint32_t *p, uint32_t expected, uint32_t desired) {
    return atomic_compare_exchange_strong_explicit(
        (volatile _Atomic uint32_t *)p, &expected, desired,
        memory_order_seq_cst, memory_order_seq_cst);
}

/* Full (store-load) fence: the Dekker-style sleep flags need it. */
static inline void acl_fence_seq_cst(void) {
    atomic_thread_fence(memory_order_seq_cst);
}

/* A hint to the CPU that we busy-wait (bounded spins in the transport). */
static inline void acl_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
