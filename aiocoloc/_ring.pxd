# cython: language_level=3
#
# The shared-memory byte ring: layout, memory ordering and the classes that
# implement it.  This file is the one place where the ring's shared layout is
# defined; the pure-Python reference (_ring_py.py) mirrors these numbers and a
# test checks that both export the same LAYOUT.
#
# Layout (all integers little-endian, as on every host and guest we target)
# ------------------------------------------------------------------------
#
#   offset size  field               written by   notes
#   0      8     magic "ACOLRING"    creator      checked once at attach
#   8      4     layout version      creator      RING_VERSION
#   12     4     header size         creator      RING_HEADER_SIZE
#   16     8     capacity            creator      power of two, >= RING_MIN_CAPACITY
#   24     40    reserved (zero)
#   64     8     tail                producer     total bytes ever written
#   72     4     producer_closed     producer     nonzero: no more data (EOF)
#   76     4     producer_waiting    producer     "wake me when space frees"
#   80     48    reserved            (tail and head on separate cache lines)
#   128    8     head                consumer     total bytes ever consumed
#   136    4     consumer_closed     consumer     nonzero: reader gone
#   140    4     consumer_sleeping   consumer     "wake me when data arrives"
#   144    112   reserved
#   256    cap   data                             byte i lives at data[i & (cap-1)]
#
# Positions are 64-bit and only ever grow; 0 <= tail - head <= capacity.
#
# Trust
# -----
# The other side may be buggy or hostile and may write anything anywhere in
# the region.  Each end therefore keeps its own position and the capacity in
# local memory (the shared copy of its own position is only published, never
# read back) and checks every position it reads from the peer before use:
#
#   consumer reading tail:  last_tail <= tail <= head + capacity
#   producer reading head:  last_head <= head <= tail
#
# A violation raises RingCorrupted and poisons that end: every later call
# raises too, so a caller can never loop on a corrupted ring.  All copies are
# bounded by the local capacity, so no access leaves the mapping.
#
# Memory ordering (C11, see includes/atomics.h)
# --------------------------------------------
# 1. Data before tail: the producer copies bytes into the ring with plain
#    stores, then store-releases the new tail.  The consumer load-acquires
#    tail, then reads the bytes below it: the acquire synchronises with the
#    release, so those bytes are visible.
# 2. Reads before head: the consumer finishes reading bytes, then
#    store-releases head.  The producer load-acquires head before reusing
#    that space, so it never overwrites bytes the consumer still reads.
# 3. Sleep flags (Dekker): a consumer about to sleep stores
#    consumer_sleeping=1, issues a seq_cst fence, then re-reads tail; a
#    producer stores tail, issues a seq_cst fence, then reads
#    consumer_sleeping.  With a full fence on both sides at least one of
#    them sees the other's store: either the consumer sees the new data and
#    does not sleep, or the producer sees the flag and rings the doorbell
#    (and clears the flag with an atomic exchange so only one ring is sent
#    per sleep).  producer_waiting/head work the same way in the other
#    direction.  Without the fences (a store followed by a load is the one
#    reordering x86-TSO allows) both could miss each other: a lost wake-up.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from cpython.buffer cimport Py_buffer


cdef extern from "includes/atomics.h":
    uint64_t acl_load_acquire_u64(const uint64_t *p) nogil
    void acl_store_release_u64(uint64_t *p, uint64_t v) nogil
    uint64_t acl_load_relaxed_u64(const uint64_t *p) nogil
    uint32_t acl_load_acquire_u32(const uint32_t *p) nogil
    void acl_store_release_u32(uint32_t *p, uint32_t v) nogil
    void acl_store_relaxed_u32(uint32_t *p, uint32_t v) nogil
    uint32_t acl_exchange_u32(uint32_t *p, uint32_t v) nogil
    void acl_fence_seq_cst() nogil


cdef enum:
    RING_VERSION = 1
    RING_HEADER_SIZE = 256
    RING_MIN_CAPACITY = 16
    OFF_MAGIC = 0
    OFF_VERSION = 8
    OFF_HEADER_SIZE = 12
    OFF_CAPACITY = 16
    OFF_TAIL = 64
    OFF_PRODUCER_CLOSED = 72
    OFF_PRODUCER_WAITING = 76
    OFF_HEAD = 128
    OFF_CONSUMER_CLOSED = 136
    OFF_CONSUMER_SLEEPING = 140
    # Copies at least this large run without the GIL.
    NOGIL_COPY_THRESHOLD = 16384


cdef class _RingEnd:
    # The exported buffer of the region; held until release() so the mapping
    # cannot be closed under us (mmap.close() raises while it is exported).
    cdef Py_buffer _buf
    cdef bint _has_buf
    cdef object _view            # memoryview over the region, for peek()
    cdef uint8_t *_base
    cdef uint8_t *_data
    cdef uint64_t _capacity      # local copy, validated once at attach
    cdef uint64_t _mask
    cdef uint64_t *_tail_p
    cdef uint64_t *_head_p
    cdef uint32_t *_producer_closed_p
    cdef uint32_t *_producer_waiting_p
    cdef uint32_t *_consumer_closed_p
    cdef uint32_t *_consumer_sleeping_p
    cdef bint _corrupted
    cdef bint _closed

    cdef void _drop_buffer(self) noexcept
    cdef int _check_usable(self) except -1
    cdef int _corrupt(self, str what) except -1


cdef class RingProducer(_RingEnd):
    cdef uint64_t _tail          # ours: the only true copy
    cdef uint64_t _last_head     # peer's, last validated value

    cdef uint64_t _load_head(self) except? 0xFFFFFFFFFFFFFFFF
    cdef Py_ssize_t _put(self, const uint8_t *src, Py_ssize_t n, bint all_or_nothing) except -1
    cdef Py_ssize_t _write(self, object data, bint all_or_nothing) except -1


cdef class RingConsumer(_RingEnd):
    cdef uint64_t _head          # ours: the only true copy
    cdef uint64_t _last_tail     # peer's, last validated value

    cdef uint64_t _load_tail(self) except? 0xFFFFFFFFFFFFFFFF
    cdef void _copy_out(self, uint8_t *dst, uint64_t n) noexcept nogil
    cdef void _advance(self, uint64_t n) noexcept
    cdef uint64_t _available(self, uint64_t wanted) except? 0xFFFFFFFFFFFFFFFF
    cdef bint _at_eof(self) except -1
