# cython: language_level=3
#
# Shared-memory byte channels: the layouts, the memory ordering and the
# classes that implement them.  This file is the one place where the layouts
# of rings and pipes are drawn and explained.  The numbers themselves live in
# _ring_layout.py, the one source both implementations read (with the region
# and ring-header checks); the enum below is their C copy for the hot path,
# and _ring refuses to import unless it matches (LayoutMismatch).  Pipe
# geometry, the layout-slot codec and resize planning are _ring_pipe_layout.py;
# the words of every run-time error, _ring_checks.py.  The classes below are
# defined in the .pxi files _ring.pyx includes, one per concept: _ring_end
# (_End), _ring_producer, _ring_consumer, _ring_contiguous (Ring*), _ring_pipe
# (Pipe*, _PipeGeometry); the pure-Python twin has one _ring_py_* module each.
# (The pool that holds pipes is laid out in aiocoloc/shm/layout.py.)
#
# Position cells (shared by rings and pipes)
# ------------------------------------------
# Every channel has a 192-byte block of cells; all integers little-endian.
#
#   offset size  field               written by   notes
#   64     8     tail                producer     total bytes ever written
#   72     4     producer_closed     producer     nonzero: no more data (EOF)
#   76     4     producer_waiting    producer     "wake me when space frees"
#   128    8     head                consumer     total bytes ever consumed
#   136    4     consumer_closed     consumer     nonzero: reader gone
#   140    4     consumer_sleeping   consumer     "wake me when data arrives"
#   144    8     layout_ack          consumer     pipes: layout seq in use
#
# Positions are 64-bit and only ever grow.  Offsets 0..63 belong to the kind
# of channel (below); tail and head sit on separate cache lines.
#
# Ring (contiguous): RingProducer / RingConsumer
# ----------------------------------------------
#   0      8     magic "ACOLRING"    creator      checked once at attach
#   8      4     layout version      creator      RING_VERSION
#   12     4     header size         creator      RING_HEADER_SIZE
#   16     8     capacity            creator      power of two, >= RING_MIN_CAPACITY
#   64..191      position cells
#   256    cap   data                             byte p lives at data[p & (cap-1)]
#
# Pipe (elastic, made of pool slices): PipeProducer / PipeConsumer
# ----------------------------------------------------------------
# A pipe entry lives in a pool's pipe table; its bytes live in the pool's
# slices (all of size S, a power of two).  The pool owns offsets 0..47.
#
#   0      48    pool bookkeeping    pool         state, members, demand (shm/layout.py)
#   48     8     layout_seq          producer     seq of the newest layout
#   64..191      position cells
#   192    L     layout slot 0       producer     L = 16 + 4 * max_slices, 8-aligned
#   192+L  L     layout slot 1       producer
#
#   layout slot: 8 start position E, 4 slice count n, 4 reserved,
#                n x u32 slice indices.
#
# Layout seq s lives in slot s & 1.  Under layout (E, n, slices) byte p >= E
# lives in slice slices[((p - E) / S) % n] at offset (p - E) % S.
#
# Resizing (grow or shrink) is a new layout that takes effect at position P:
#   - P is the slice boundary at or below tail, and the new slice list starts
#     with the old list rotated so that bytes [P, P + min(n, n') * S) land in
#     the same slices under both layouts.  The bytes [P, tail) already
#     written are thus where both layouts put them, and tail < P + S, so
#     they fit even a one-slice layout;
#   - while head < P the producer's limit is min(head + n*S, P + n'*S), so it
#     never writes a slice that still holds unread bytes of the old layout;
#     once head >= P the limit is head + n'*S and the slices the new layout
#     dropped hold no unread byte: the pool may take them back.  P <= tail,
#     so a pipe that goes idle completes its switch as soon as it drains;
#   - the producer publishes the new layout (slot, then store-release of
#     layout_seq) before it writes again; the consumer load-acquires tail,
#     then layout_seq, so it knows the layout of every byte it can see;
#   - at most one layout is pending: the producer publishes seq s+1 only
#     after the consumer acknowledged seq s (layout_ack), so the slot it
#     overwrites is one the consumer has copied and no longer reads.
#
# Trust
# -----
# The other side may be buggy or hostile and may write anything anywhere in
# the region.  Each end therefore keeps its own position, the geometry
# (capacity, slice size and count) and its copy of the layouts in local
# memory (the shared copy of its own position is only published, never read
# back) and checks everything it reads from the peer before use:
#
#   consumer reading tail:   last_tail <= tail <= limit(head)
#   producer reading head:   last_head <= head <= tail
#   consumer reading layout: seq is current or current+1, slice count in
#                            1..max_slices, every index < slice count,
#                            start >= the current layout's start
#
# A violation raises RingCorrupted and poisons that end: every later call
# raises too, so a caller can never loop on a corrupted channel.  All copies
# are bounded by the locally known geometry, so no access leaves the mapping.
#
# Memory ordering (C11, see includes/atomics.h)
# --------------------------------------------
# 1. Data before tail: the producer copies bytes with plain stores, then
#    store-releases the new tail.  The consumer load-acquires tail, then reads
#    the bytes below it: the acquire synchronises with the release.
# 2. Reads before head: the consumer finishes reading, then store-releases
#    head.  The producer load-acquires head before reusing that space.
# 3. Sleep flags (Dekker): a consumer about to sleep stores
#    consumer_sleeping=1, issues a seq_cst fence, then re-reads tail; a
#    producer stores tail, issues a seq_cst fence, then reads
#    consumer_sleeping.  With a full fence on both sides at least one sees
#    the other's store: either the consumer sees the data and does not sleep,
#    or the producer sees the flag and rings (clearing it with an atomic
#    exchange so one sleep gets one ring).  producer_waiting/head work the
#    same way in the other direction.  Without the fences (store then load is
#    the one reordering x86-TSO allows) both could miss: a lost wake-up.
# 4. Shared doorbells (aiocoloc/notify/hub.py): many pipes may ring one eventfd.
#    The flags above still decide whether a ring is needed.  The listener
#    reads the eventfd first, then looks at each pipe whose end sleeps or
#    waits (sleep_over()/wait_over(): the flag taken by the peer, tail vs
#    head, the closed flags).  A producer clears the flag (exchange) before
#    it rings; so a pipe whose ring the read consumed shows a cleared flag,
#    and a ring that lands after the read makes the eventfd readable
#    again: no wake-up is lost.  (A cleared flag also wakes a reader whose
#    bytes were drained meanwhile by other means: it must sleep again.)
#    A hub skips the eventfd write while a ring is outstanding (a shared
#    word the listener clears before it looks); sleep_over()/wait_over()
#    start with a seq_cst fence so that clear is ordered before their loads,
#    the mirror of the ringer's fence in wake_needed().

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
    void acl_cpu_relax() nogil


# C copies of _ring_layout's numbers (checked when _ring loads).
cdef enum:
    RING_VERSION = 1
    RING_HEADER_SIZE = 256
    RING_MIN_CAPACITY = 16
    OFF_MAGIC = 0
    OFF_VERSION = 8
    OFF_HEADER_SIZE = 12
    OFF_CAPACITY = 16
    OFF_LAYOUT_SEQ = 48
    OFF_TAIL = 64
    OFF_PRODUCER_CLOSED = 72
    OFF_PRODUCER_WAITING = 76
    OFF_HEAD = 128
    OFF_CONSUMER_CLOSED = 136
    OFF_CONSUMER_SLEEPING = 140
    OFF_LAYOUT_ACK = 144
    OFF_LAYOUT_SLOTS = 192
    LAYOUT_SLOT_HEADER = 16
    # Copies at least this large run without the GIL.
    NOGIL_COPY_THRESHOLD = 16384


# Where a byte position lives: an offset into the exported buffer, and how
# many bytes from there are contiguous in the channel.
cdef struct Span:
    uint64_t offset
    uint64_t length


# A pipe layout, copied into local memory.
cdef struct Layout:
    uint64_t start
    uint64_t count
    uint32_t *slices


# Geometry of the pool a pipe lives in, validated by the caller (the pool)
# and kept locally by the pipe end.
cdef class _PipeGeometry:
    cdef uint64_t entry_offset
    cdef uint64_t data_offset
    cdef uint64_t slice_size
    cdef uint64_t slice_shift
    cdef uint64_t slice_count
    cdef uint64_t max_slices
    cdef uint64_t slot_size      # bytes of one layout slot


cdef class _End:
    # The exported buffer of the region; held until release() so the mapping
    # cannot be closed under us (mmap.close() raises while it is exported).
    cdef Py_buffer _buf
    cdef bint _has_buf
    cdef object _view            # memoryview over the region, for peek()
    cdef uint8_t *_base
    cdef uint64_t *_tail_p
    cdef uint64_t *_head_p
    cdef uint32_t *_producer_closed_p
    cdef uint32_t *_producer_waiting_p
    cdef uint32_t *_consumer_closed_p
    cdef uint32_t *_consumer_sleeping_p
    cdef bint _corrupted
    cdef bint _closed
    cdef object __weakref__      # pools track the ends they hand out
    # Placement.  A contiguous ring: its capacity (local copy, validated at
    # attach).  A pipe: the pool geometry and the layouts, copied locally.
    # Bound by the placements' attach functions, _attach_ring/_attach_pipe.
    cdef uint64_t _capacity
    cdef uint64_t _mask
    cdef bint _is_pipe
    cdef _PipeGeometry _geo
    cdef uint64_t *_layout_seq_p
    cdef uint64_t *_layout_ack_p
    cdef uint64_t _seq           # producer: newest published; consumer: in use
    cdef Layout _cur             # layout of bytes below _switch
    cdef Layout _next            # layout of bytes at and after _switch
    cdef uint64_t _switch        # start of the pending layout
    cdef bint _pending           # _next is published and may still be ahead

    cdef int _export(self, object buffer) except -1
    cdef void _bind_cells(self, uint64_t offset) noexcept
    cdef void _drop_buffer(self) noexcept
    cdef int _check_usable(self) except -1
    cdef int _corrupt(self, str what) except -1
    cdef int _attach_positions(self, uint64_t *head, uint64_t *tail) except -1
    # Placement: where position ``pos`` lives (both ends): the contiguous
    # ring's, or the pipe's when _is_pipe (a branch on a local flag).
    cdef Span _locate(self, uint64_t pos, uint64_t want) noexcept nogil
    # The highest tail allowed when the consumer is at ``head``.
    cdef uint64_t _limit(self, uint64_t head) noexcept nogil


cdef class _Producer(_End):
    cdef uint64_t _tail          # ours: the only true copy
    cdef uint64_t _last_head     # peer's, last validated value
    # Demand, for the pool's proportional allocation (aiocoloc/elastic.py):
    # bytes accepted, and time spent unable to place a whole write.
    cdef uint64_t _offered
    cdef uint64_t _blocked_ns
    cdef uint64_t _blocked_since # 0 while not blocked

    cdef int _start_positions(self) except -1
    cdef uint64_t _load_head(self) except? 0xFFFFFFFFFFFFFFFF
    cdef Py_ssize_t _put(self, const uint8_t *src, Py_ssize_t n, bint all_or_nothing) except -1
    cdef Py_ssize_t _write(self, object data, bint all_or_nothing) except -1
    cdef void _note_blocked(self, bint blocked) noexcept
    cdef void _copy_in(self, const uint8_t *src, uint64_t n) noexcept nogil


cdef class _Consumer(_End):
    cdef uint64_t _head          # ours: the only true copy
    cdef uint64_t _last_tail     # peer's, last validated value

    cdef int _start_positions(self) except -1
    cdef int _before_tail_check(self) except -1
    cdef int _after_advance(self) except -1
    cdef uint64_t _load_tail(self) except? 0xFFFFFFFFFFFFFFFF
    cdef void _copy_out(self, uint8_t *dst, uint64_t n) noexcept nogil
    cdef int _advance(self, uint64_t n) except -1
    cdef uint64_t _available(self, uint64_t wanted) except? 0xFFFFFFFFFFFFFFFF
    cdef bint _at_eof(self) except -1


cdef class RingProducer(_Producer):
    pass


cdef class RingConsumer(_Consumer):
    pass


cdef class PipeProducer(_Producer):
    # The layout the consumer acknowledged: ours (_seq) or the one before.
    cdef uint64_t _check_ack(self) except? 0xFFFFFFFFFFFFFFFF
    cdef int _publish(self, uint64_t start, list slices) except -1


cdef class PipeConsumer(_Consumer):
    pass
