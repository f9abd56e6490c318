# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Single-producer/single-consumer byte channels over shared memory (Cython core).

Two placements share one producer and one consumer implementation: the
contiguous ring (``RingProducer``/``RingConsumer``) and the elastic pipe made
of pool slices (``PipeProducer``/``PipeConsumer``).  Layouts, trust rules and
the memory-ordering argument are in ``_ring.pxd``; ``_ring_py.py`` is the
readable reference with the same API.  This module holds the hot path and the
checks of what the peer writes; the cold path (layout numbers, attach checks,
geometry, resize planning) is ``_ring_layout.py``, shared with the reference.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE,
)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from aiocoloc import _ring_layout as _L
from aiocoloc._ring_layout import pipe_entry_size, ring_size
from aiocoloc.errors import RingAttachError, RingClosed, RingCorrupted

__all__ = [
    "HEADER_SIZE", "MIN_CAPACITY", "LAYOUT_VERSION", "MAGIC", "LAYOUT", "IMPLEMENTATION",
    "ring_size", "format_ring", "RingProducer", "RingConsumer",
    "pipe_entry_size", "format_pipe", "PipeProducer", "PipeConsumer",
]

IMPLEMENTATION = "cython"
HEADER_SIZE = _L.HEADER_SIZE
MIN_CAPACITY = _L.MIN_CAPACITY
LAYOUT_VERSION = _L.LAYOUT_VERSION
MAGIC = _L.MAGIC
# Little-endian u64 view of MAGIC: format_ring stores it as one atomic word, last.
cdef uint64_t _MAGIC_U64 = int.from_bytes(MAGIC, "little")

# The numbers this module was compiled with (the enum in _ring.pxd); it does
# not import unless they are _ring_layout's, the single source.
LAYOUT = {
    "version": RING_VERSION,
    "header_size": RING_HEADER_SIZE,
    "min_capacity": RING_MIN_CAPACITY,
    "magic": MAGIC,
    "magic_offset": OFF_MAGIC,
    "version_offset": OFF_VERSION,
    "header_size_offset": OFF_HEADER_SIZE,
    "capacity_offset": OFF_CAPACITY,
    "layout_seq_offset": OFF_LAYOUT_SEQ,
    "tail_offset": OFF_TAIL,
    "producer_closed_offset": OFF_PRODUCER_CLOSED,
    "producer_waiting_offset": OFF_PRODUCER_WAITING,
    "head_offset": OFF_HEAD,
    "consumer_closed_offset": OFF_CONSUMER_CLOSED,
    "consumer_sleeping_offset": OFF_CONSUMER_SLEEPING,
    "layout_ack_offset": OFF_LAYOUT_ACK,
    "layout_slots_offset": OFF_LAYOUT_SLOTS,
    "layout_slot_header": LAYOUT_SLOT_HEADER,
}
_L.check_compiled_layout(LAYOUT, __name__)

cdef uint64_t _NO_LIMIT = <uint64_t>-1


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef inline uint64_t _min(uint64_t a, uint64_t b) noexcept nogil:
    return a if a < b else b


cdef int _get_region(object buffer, Py_buffer *view, Py_ssize_t minimum) except -1:
    """Export ``buffer`` writable and check its size and alignment."""
    try:
        PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE)
    except BufferError as exc:
        raise _L.not_writable(exc) from None
    except TypeError:
        raise _L.not_a_buffer(buffer) from None
    try:
        _L.check_region(view.len, <uintptr_t>view.buf, minimum)
    except BaseException:
        PyBuffer_Release(view)
        raise
    return 0


# ---------------------------------------------------------------------------
# Pipe layouts (the placement of elastic pipes; see _ring.pxd)
# ---------------------------------------------------------------------------

cdef class _PipeGeometry:
    """A C copy of ``_ring_layout.PipeGeometry``, checked against the region."""

    def __init__(self, Py_ssize_t region_len, entry_offset, data_offset, slice_size,
                 slice_count, max_slices):
        geo = _L.PipeGeometry.checked(region_len, entry_offset, data_offset, slice_size,
                                      slice_count, max_slices)
        self.entry_offset = geo.entry_offset
        self.data_offset = geo.data_offset
        self.slice_size = geo.slice_size
        self.slice_shift = geo.slice_shift
        self.slice_count = geo.slice_count
        self.max_slices = geo.max_slices
        self.slot_size = geo.slot_size


def format_pipe(buffer, entry_offset, max_slices, slices, start=0) -> None:
    """Initialise a pipe entry (offsets 48 and up) with its first layout.

    The pool calls this while it owns the entry; nothing may be attached.
    """
    cdef Py_buffer view
    cdef uint8_t *entry
    cdef Py_ssize_t i
    cdef uint64_t size
    _L.check_first_layout(max_slices, slices)
    _get_region(buffer, &view, 0)
    try:
        size = _L.check_pipe_entry(view.len, entry_offset, max_slices)
        entry = <uint8_t *>view.buf + <uint64_t>entry_offset
        memset(entry + OFF_LAYOUT_SEQ, 0, size - OFF_LAYOUT_SEQ)
        (<uint64_t *>(entry + OFF_TAIL))[0] = start
        (<uint64_t *>(entry + OFF_HEAD))[0] = start
        (<uint64_t *>(entry + OFF_LAYOUT_SLOTS))[0] = start
        (<uint32_t *>(entry + OFF_LAYOUT_SLOTS + 8))[0] = len(slices)
        for i in range(len(slices)):
            (<uint32_t *>(entry + OFF_LAYOUT_SLOTS + LAYOUT_SLOT_HEADER))[i] = slices[i]
        acl_store_release_u64(<uint64_t *>(entry + OFF_LAYOUT_SEQ), 0)
    finally:
        PyBuffer_Release(&view)


cdef inline Span _pipe_locate(_PipeGeometry geo, Layout *layout, uint64_t pos) noexcept nogil:
    cdef Span span
    cdef uint64_t rel = pos - layout.start
    cdef uint64_t off = rel & (geo.slice_size - 1)
    # layout.count >= 1 and every index < slice_count: validated on copy-in.
    cdef uint64_t index = layout.slices[(rel >> geo.slice_shift) % layout.count]
    span.offset = geo.data_offset + (index << geo.slice_shift) + off
    span.length = geo.slice_size - off
    return span


cdef inline uint64_t _pipe_limit(uint64_t head, Layout *cur, Layout *nxt, bint pending,
                                 uint64_t switch, uint64_t slice_size) noexcept nogil:
    if not pending:
        return head + cur.count * slice_size
    if head < switch:
        return _min(head + cur.count * slice_size, switch + nxt.count * slice_size)
    return head + nxt.count * slice_size


cdef int _copy_layout(_End end, _PipeGeometry geo, uint64_t seq, Layout *into) except -1:
    """Copy layout slot ``seq & 1`` into local memory, validating each value once."""
    cdef uint8_t *slot = (end._base + geo.entry_offset + OFF_LAYOUT_SLOTS
                          + (seq & 1) * geo.slot_size)
    cdef uint64_t count = (<uint32_t *>(slot + 8))[0]
    cdef uint64_t i, index
    if count < 1 or count > geo.max_slices:
        end._corrupt(f"pipe layout {seq} has {count} slices (allowed 1..{geo.max_slices})")
    into.start = (<uint64_t *>slot)[0]
    for i in range(count):
        index = (<uint32_t *>(slot + LAYOUT_SLOT_HEADER))[i]
        if index >= geo.slice_count:
            end._corrupt(f"pipe layout {seq} names slice {index} of {geo.slice_count}")
        into.slices[i] = <uint32_t>index
    into.count = count
    return 0


cdef uint32_t *_alloc_slices(uint64_t n) except NULL:
    cdef uint32_t *p = <uint32_t *>malloc(n * sizeof(uint32_t))
    if p == NULL:
        raise MemoryError()
    return p


cdef list _layout_list(Layout *layout):
    return [layout.slices[i] for i in range(layout.count)]


# ---------------------------------------------------------------------------
# Both ends
# ---------------------------------------------------------------------------

cdef class _End:
    """What both ends share: the exported region, the flags, closing, releasing."""

    cdef int _export(self, object buffer) except -1:
        if self._has_buf:
            raise RuntimeError("this end is already attached")
        _get_region(buffer, &self._buf, RING_HEADER_SIZE + RING_MIN_CAPACITY)
        self._has_buf = True
        self._base = <uint8_t *>self._buf.buf
        return 0

    cdef void _bind_cells(self, uint64_t offset) noexcept:
        cdef uint8_t *cells = self._base + offset
        self._tail_p = <uint64_t *>(cells + OFF_TAIL)
        self._head_p = <uint64_t *>(cells + OFF_HEAD)
        self._producer_closed_p = <uint32_t *>(cells + OFF_PRODUCER_CLOSED)
        self._producer_waiting_p = <uint32_t *>(cells + OFF_PRODUCER_WAITING)
        self._consumer_closed_p = <uint32_t *>(cells + OFF_CONSUMER_CLOSED)
        self._consumer_sleeping_p = <uint32_t *>(cells + OFF_CONSUMER_SLEEPING)

    def __dealloc__(self):
        self._drop_buffer()
        free(self._cur.slices)
        free(self._next.slices)

    cdef void _drop_buffer(self) noexcept:
        if self._has_buf:
            self._has_buf = False
            self._base = NULL
            PyBuffer_Release(&self._buf)

    cdef int _check_usable(self) except -1:
        if self._corrupted:
            raise RingCorrupted("ring end already saw a corrupted header")
        if not self._has_buf:
            raise ValueError("ring end has been released")
        return 0

    cdef int _corrupt(self, str what) except -1:
        self._corrupted = True
        raise RingCorrupted(what)

    cdef int _attach_positions(self, uint64_t *head, uint64_t *tail) except -1:
        """Both positions as found at attach, checked against each other."""
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        cdef uint64_t t = acl_load_acquire_u64(self._tail_p)
        if h > t or t > self._limit(h):
            self._corrupt(f"ring positions invalid at attach: head {h}, tail {t}")
        head[0] = h
        tail[0] = t
        return 0

    cdef Span _locate(self, uint64_t pos) noexcept nogil:
        cdef Span span
        cdef uint64_t off
        if self._is_pipe:
            if self._pending and pos >= self._switch:
                return _pipe_locate(self._geo, &self._next, pos)
            return _pipe_locate(self._geo, &self._cur, pos)
        off = pos & self._mask
        span.offset = RING_HEADER_SIZE + off
        span.length = self._capacity - off
        return span

    cdef uint64_t _limit(self, uint64_t head) noexcept nogil:
        if self._is_pipe:
            return _pipe_limit(head, &self._cur, &self._next, self._pending, self._switch,
                               self._geo.slice_size)
        return head + self._capacity

    @property
    def capacity(self) -> int:
        """Data bytes the channel holds (a pipe: under the newest layout this end knows)."""
        if self._is_pipe:
            return (self._next.count if self._pending else self._cur.count) * self._geo.slice_size
        return self._capacity

    cdef int _attach_pipe(self, object region, object entry_offset, object data_offset,
                          object slice_size, object slice_count, object max_slices) except -1:
        """Export the pool ``region`` and bind this end to the pipe entry there."""
        self._export(region)
        try:
            self._geo = _PipeGeometry(self._buf.len, entry_offset, data_offset, slice_size,
                                      slice_count, max_slices)
        except BaseException:
            self._drop_buffer()
            raise
        self._is_pipe = True
        self._cur.slices = _alloc_slices(max_slices)
        self._next.slices = _alloc_slices(max_slices)
        self._bind_cells(self._geo.entry_offset)
        self._layout_seq_p = <uint64_t *>(self._base + self._geo.entry_offset + OFF_LAYOUT_SEQ)
        self._layout_ack_p = <uint64_t *>(self._base + self._geo.entry_offset + OFF_LAYOUT_ACK)
        self._view = memoryview(region).cast("B")
        return 0

    @property
    def closed(self) -> bool:
        """True once this end called ``close()``."""
        return self._closed

    @property
    def corrupted(self) -> bool:
        """True once this end saw the peer break the channel's invariants."""
        return self._corrupted

    @property
    def released(self) -> bool:
        """True once ``release()`` dropped the buffer."""
        return not self._has_buf

    def release(self) -> None:
        """Drop this end's hold on the buffer (the mapping may then close)."""
        self._drop_buffer()
        if self._view is not None:
            self._view.release()
            self._view = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._has_buf and not self._corrupted:
            self.close()
        self.release()


# ---------------------------------------------------------------------------
# The producer: one implementation for every placement
# ---------------------------------------------------------------------------

cdef class _Producer(_End):
    """The writing end.  One producer per channel, ever at a time."""

    cdef int _start_positions(self) except -1:
        self._attach_positions(&self._last_head, &self._tail)
        return 0

    cdef uint64_t _load_head(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        if h < self._last_head:
            self._corrupt(f"consumer head moved backwards: {h} < {self._last_head}")
        if h > self._tail:
            self._corrupt(f"consumer head {h} is past the producer tail {self._tail}")
        self._last_head = h
        return h

    cdef void _copy_in(self, const uint8_t *src, uint64_t n) noexcept nogil:
        cdef uint64_t pos = self._tail
        cdef Span span
        while n:
            span = self._locate(pos)
            span.length = _min(span.length, n)
            memcpy(self._base + span.offset, src, span.length)
            src += span.length
            pos += span.length
            n -= span.length

    cdef Py_ssize_t _put(self, const uint8_t *src, Py_ssize_t n, bint all_or_nothing) except -1:
        cdef uint64_t free, k
        self._check_usable()
        if self._closed:
            raise RingClosed("write to a ring after its producer closed it")
        if acl_load_acquire_u32(self._consumer_closed_p):
            raise RingClosed("the ring's consumer has closed")
        # The cached head is a lower bound of the real one: reload (a cache
        # miss on the consumer's line) only when it does not leave room.
        free = self._limit(self._last_head) - self._tail
        if free < <uint64_t>n:
            free = self._limit(self._load_head()) - self._tail
        if all_or_nothing and <uint64_t>n > free:
            self._note_blocked(True)
            return 0
        k = _min(<uint64_t>n, free)
        self._note_blocked(k < <uint64_t>n)
        if k == 0:
            return 0
        self._offered += k
        if k >= NOGIL_COPY_THRESHOLD:
            with nogil:
                self._copy_in(src, k)
        else:
            self._copy_in(src, k)
        self._tail += k
        acl_store_release_u64(self._tail_p, self._tail)
        return k

    cdef inline void _note_blocked(self, bint blocked) noexcept:
        if blocked:
            if not self._blocked_since:
                self._blocked_since = _now_ns()
        elif self._blocked_since:
            self._blocked_ns += _now_ns() - self._blocked_since
            self._blocked_since = 0

    @property
    def offered(self) -> int:
        """Bytes this producer has accepted (its demand, for resizing)."""
        return self._offered

    @property
    def blocked_ns(self) -> int:
        """Nanoseconds writes found the channel too full, the current spell included."""
        if self._blocked_since:
            return self._blocked_ns + _now_ns() - self._blocked_since
        return self._blocked_ns

    cdef Py_ssize_t _write(self, object data, bint all_or_nothing) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t n
        cdef uint64_t capacity = self._limit(self._last_head) - self._last_head
        if type(data) is bytes:
            n = PyBytes_GET_SIZE(data)
            if all_or_nothing and <uint64_t>n > capacity:
                raise ValueError(f"{n} bytes can never fit a ring of capacity {capacity}")
            return self._put(<const uint8_t *>PyBytes_AS_STRING(data), n, all_or_nothing)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if all_or_nothing and <uint64_t>view.len > capacity:
                raise ValueError(f"{view.len} bytes can never fit a ring of capacity {capacity}")
            return self._put(<const uint8_t *>view.buf, view.len, all_or_nothing)
        finally:
            PyBuffer_Release(&view)

    def write(self, data) -> int:
        """Copy as much of ``data`` as fits; return the number of bytes written."""
        return self._write(data, False)

    def write_all(self, data) -> bool:
        """Copy all of ``data`` if it fits now, else nothing; return whether it did."""
        return self._write(data, True) != 0 or len(data) == 0

    def free(self) -> int:
        """Bytes that can be written now."""
        self._check_usable()
        return self._limit(self._load_head()) - self._tail

    def used(self) -> int:
        """Bytes written and not yet consumed."""
        self._check_usable()
        return self._tail - self._load_head()

    @property
    def position(self) -> int:
        """Total bytes this producer has written (the tail)."""
        return self._tail

    @property
    def peer_closed(self) -> bool:
        """True once the consumer has closed its end."""
        self._check_usable()
        return acl_load_acquire_u32(self._consumer_closed_p) != 0

    def close(self) -> None:
        """Mark end of data: the consumer reads what is left, then EOF."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            acl_store_release_u32(self._producer_closed_p, 1)

    def wake_needed(self) -> bool:
        """After writing: True if the consumer sleeps and must be rung (once)."""
        self._check_usable()
        acl_fence_seq_cst()
        if acl_load_acquire_u32(self._consumer_sleeping_p):
            return acl_exchange_u32(self._consumer_sleeping_p, 0) != 0
        return False

    def wait_over(self) -> bool:
        """After ``prepare_wait``: True once there is a reason to wake -- the
        consumer took the announcement (it rings us), a byte fits, or the
        consumer closed.  A cheap look, for a doorbell shared by many pipes."""
        self._check_usable()
        # The hub cleared its "ring outstanding" word just before: order that
        # store before these loads (see aiocoloc/hub.py).
        acl_fence_seq_cst()
        return (acl_load_acquire_u32(self._producer_waiting_p) == 0
                or self._limit(self._load_head()) != self._tail
                or acl_load_acquire_u32(self._consumer_closed_p) != 0)

    def prepare_wait(self, Py_ssize_t nbytes=1) -> bool:
        """Announce that we wait for ``nbytes`` of space.

        Returns True if the caller should now sleep until the consumer rings;
        False if the space is already there (the announcement is withdrawn).
        """
        self._check_usable()
        acl_store_relaxed_u32(self._producer_waiting_p, 1)
        acl_fence_seq_cst()
        if (self._limit(self._load_head()) - self._tail >= <uint64_t>nbytes
                or acl_load_acquire_u32(self._consumer_closed_p)):
            acl_store_relaxed_u32(self._producer_waiting_p, 0)
            return False
        return True

    def cancel_wait(self) -> None:
        """Withdraw a ``prepare_wait`` announcement."""
        self._check_usable()
        acl_store_relaxed_u32(self._producer_waiting_p, 0)


# ---------------------------------------------------------------------------
# The consumer: one implementation for every placement
# ---------------------------------------------------------------------------

cdef class _Consumer(_End):
    """The reading end.  One consumer per channel, ever at a time."""

    cdef int _start_positions(self) except -1:
        self._attach_positions(&self._head, &self._last_tail)
        return 0

    cdef int _before_tail_check(self) except -1:
        return 0

    cdef int _after_advance(self) except -1:
        return 0

    cdef uint64_t _load_tail(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t t = acl_load_acquire_u64(self._tail_p)
        self._before_tail_check()
        if t < self._last_tail:
            self._corrupt(f"producer tail moved backwards: {t} < {self._last_tail}")
        if t > self._limit(self._head):
            self._corrupt(
                f"producer tail {t} is more than capacity "
                f"{self._limit(self._head) - self._head} ahead of the consumer head {self._head}"
            )
        self._last_tail = t
        return t

    cdef void _copy_out(self, uint8_t *dst, uint64_t n) noexcept nogil:
        cdef uint64_t pos = self._head
        cdef Span span
        while n:
            span = self._locate(pos)
            span.length = _min(span.length, n)
            memcpy(dst, self._base + span.offset, span.length)
            dst += span.length
            pos += span.length
            n -= span.length

    cdef int _advance(self, uint64_t n) except -1:
        self._head += n
        acl_store_release_u64(self._head_p, self._head)
        self._after_advance()
        return 0

    cdef uint64_t _available(self, uint64_t wanted) except? 0xFFFFFFFFFFFFFFFF:
        """Readable bytes, at least ``wanted`` if there are that many.

        The cached tail is a lower bound of the real one: reload (a cache miss
        on the producer's line) only when it does not cover ``wanted``.
        0 means empty (check ``_at_eof`` for EOF).
        """
        cdef uint64_t avail
        self._check_usable()
        avail = self._last_tail - self._head
        if avail < wanted or avail == 0:
            avail = self._load_tail() - self._head
        return avail

    cdef bint _at_eof(self) except -1:
        # The producer stores its data and tail before the closed flag, so
        # read the flag first, then look at the tail once more.
        if not acl_load_acquire_u32(self._producer_closed_p):
            return False
        return self._load_tail() == self._head

    def readinto(self, buffer):
        """Read up to ``len(buffer)`` bytes into it.

        Returns the count, ``None`` if the channel is empty, or 0 at EOF.
        """
        cdef Py_buffer view
        cdef uint64_t avail, k
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            avail = self._available(<uint64_t>view.len)
            if avail == 0:
                return 0 if self._at_eof() else None
            k = _min(<uint64_t>view.len, avail)
            if k >= NOGIL_COPY_THRESHOLD:
                with nogil:
                    self._copy_out(<uint8_t *>view.buf, k)
            else:
                self._copy_out(<uint8_t *>view.buf, k)
            self._advance(k)
            return k
        finally:
            PyBuffer_Release(&view)

    def read(self, Py_ssize_t n=-1):
        """Read up to ``n`` bytes (all available if negative) as ``bytes``.

        Returns ``None`` if the channel is empty, ``b""`` at EOF.
        """
        cdef uint64_t avail, k
        cdef bytes out
        cdef uint8_t *dst
        avail = self._available(<uint64_t>n if n >= 0 else _NO_LIMIT)
        if avail == 0:
            return b"" if self._at_eof() else None
        k = avail if n < 0 or <uint64_t>n > avail else <uint64_t>n
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>k)
        dst = <uint8_t *>PyBytes_AS_STRING(out)
        if k >= NOGIL_COPY_THRESHOLD:
            with nogil:
                self._copy_out(dst, k)
        else:
            self._copy_out(dst, k)
        self._advance(k)
        return out

    def peek(self, Py_ssize_t n=-1):
        """A zero-copy view of up to ``n`` readable bytes that are contiguous
        in memory (up to the wrap point, or the end of a slice).

        Nothing is consumed: call ``consume()`` when done with the view.
        Returns ``None`` if the channel is empty, an empty view at EOF.  The
        peer may not overwrite viewed bytes until they are consumed, but a
        hostile peer could: treat the contents as untrusted input.
        """
        cdef uint64_t avail, k
        cdef Span span
        avail = self._available(<uint64_t>n if n >= 0 else _NO_LIMIT)
        if avail == 0:
            return self._view[:0] if self._at_eof() else None
        span = self._locate(self._head)
        k = _min(span.length, avail)
        if 0 <= n < <Py_ssize_t>k:
            k = <uint64_t>n
        return self._view[span.offset:span.offset + k]

    def consume(self, Py_ssize_t n) -> None:
        """Mark ``n`` readable bytes as consumed (after ``peek``)."""
        cdef uint64_t avail = self._available(<uint64_t>n if n >= 0 else 0)
        if n < 0 or <uint64_t>n > avail:
            raise ValueError(f"cannot consume {n} bytes: {avail} are readable")
        self._advance(<uint64_t>n)

    def free(self) -> int:
        """Bytes the producer could write now."""
        cdef uint64_t used = self._available(_NO_LIMIT)
        return self._limit(self._head) - self._head - used

    def used(self) -> int:
        """Bytes readable now."""
        return self._available(_NO_LIMIT)

    @property
    def position(self) -> int:
        """Total bytes this consumer has consumed (the head)."""
        return self._head

    @property
    def peer_closed(self) -> bool:
        """True once the producer has closed its end."""
        self._check_usable()
        return acl_load_acquire_u32(self._producer_closed_p) != 0

    def at_eof(self) -> bool:
        """True when the producer has closed and every byte is consumed."""
        self._check_usable()
        return self._at_eof()

    def close(self) -> None:
        """Tell the producer we read no more: its writes raise ``RingClosed``."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            acl_store_release_u32(self._consumer_closed_p, 1)

    def wake_needed(self) -> bool:
        """After consuming: True if the producer waits for space and must be rung."""
        self._check_usable()
        acl_fence_seq_cst()
        if acl_load_acquire_u32(self._producer_waiting_p):
            return acl_exchange_u32(self._producer_waiting_p, 0) != 0
        return False

    def sleep_over(self) -> bool:
        """After ``prepare_sleep``: True once there is a reason to wake -- the
        producer took the announcement (it rings us), or bytes or EOF came.
        Consumes nothing.  A cheap look, for a doorbell shared by many pipes."""
        self._check_usable()
        # The hub cleared its "ring outstanding" word just before: order that
        # store before these loads (see aiocoloc/hub.py).  Acquire: a cleared
        # flag comes after the bytes it rings for.
        acl_fence_seq_cst()
        if acl_load_acquire_u32(self._consumer_sleeping_p) == 0 or self._available(1):
            return True
        return acl_load_acquire_u32(self._producer_closed_p) != 0

    def prepare_sleep(self) -> bool:
        """Announce that we sleep until data arrives.

        Returns True if the caller should now sleep until the producer rings;
        False if data (or EOF) is already there (the announcement is withdrawn).
        """
        self._check_usable()
        acl_store_relaxed_u32(self._consumer_sleeping_p, 1)
        acl_fence_seq_cst()
        if self._load_tail() != self._head or acl_load_acquire_u32(self._producer_closed_p):
            acl_store_relaxed_u32(self._consumer_sleeping_p, 0)
            return False
        return True

    def cancel_sleep(self) -> None:
        """Withdraw a ``prepare_sleep`` announcement."""
        self._check_usable()
        acl_store_relaxed_u32(self._consumer_sleeping_p, 0)

    def spin_until_readable(self, uint64_t max_ns) -> bool:
        """Busy-wait, without the GIL, up to ``max_ns`` for data or EOF.

        True if the tail moved or the producer closed (the next read checks
        what it finds); False when the time is up.  Call it only while awake
        (no ``prepare_sleep`` announcement), so that the peer skips the ring.
        """
        cdef uint64_t deadline, spins = 0
        cdef uint64_t head = self._head
        cdef const uint64_t *tail_p = self._tail_p
        cdef const uint32_t *closed_p = self._producer_closed_p
        cdef bint found = False
        self._check_usable()
        with nogil:
            deadline = _now_ns() + max_ns
            while True:
                if acl_load_acquire_u64(tail_p) != head or acl_load_acquire_u32(closed_p):
                    found = True
                    break
                spins += 1
                if (spins & 63) == 0 and _now_ns() >= deadline:
                    break
                acl_cpu_relax()
        return found


# ---------------------------------------------------------------------------
# Contiguous ring
# ---------------------------------------------------------------------------

def format_ring(buffer, capacity=None) -> int:
    """Write a fresh ring header into ``buffer`` and return the capacity.

    ``capacity`` defaults to the largest power of two that fits.  Positions
    start at zero; nothing must be attached to the region while it is
    formatted.
    """
    cdef Py_buffer view
    cdef uint64_t cap
    cdef uint8_t *base
    _get_region(buffer, &view, RING_HEADER_SIZE + RING_MIN_CAPACITY)
    try:
        cap = _L.format_capacity(view.len, capacity)
        base = <uint8_t *>view.buf
        memset(base, 0, RING_HEADER_SIZE)
        (<uint32_t *>(base + OFF_VERSION))[0] = RING_VERSION
        (<uint32_t *>(base + OFF_HEADER_SIZE))[0] = RING_HEADER_SIZE
        (<uint64_t *>(base + OFF_CAPACITY))[0] = cap
        # Magic last, with release: whoever sees it sees a whole header.
        acl_store_release_u64(<uint64_t *>(base + OFF_MAGIC), _MAGIC_U64)
        return cap
    finally:
        PyBuffer_Release(&view)


cdef uint64_t _attach_ring(_End end, object buffer) except 0:
    """Export ``buffer``, validate its ring header, bind the cells; return capacity."""
    cdef uint64_t magic, cap
    cdef uint32_t version, header_size
    cdef uint8_t *base
    end._export(buffer)
    base = end._base
    # Magic first, with acquire: the creator stores it last (format_ring).
    magic = acl_load_acquire_u64(<uint64_t *>(base + OFF_MAGIC))
    version = (<uint32_t *>(base + OFF_VERSION))[0]
    header_size = (<uint32_t *>(base + OFF_HEADER_SIZE))[0]
    cap = (<uint64_t *>(base + OFF_CAPACITY))[0]
    problem = _L.ring_header_problem(int(magic).to_bytes(8, "little"), version, header_size,
                                     cap, end._buf.len)
    if problem is not None:
        end._drop_buffer()
        raise RingAttachError(problem)
    end._bind_cells(0)
    end._view = memoryview(buffer).cast("B")
    return cap


cdef class RingProducer(_Producer):
    """The writing end of a contiguous ring."""

    def __init__(self, buffer):
        self._capacity = _attach_ring(self, buffer)
        self._mask = self._capacity - 1
        self._start_positions()


cdef class RingConsumer(_Consumer):
    """The reading end of a contiguous ring."""

    def __init__(self, buffer):
        self._capacity = _attach_ring(self, buffer)
        self._mask = self._capacity - 1
        self._start_positions()


# ---------------------------------------------------------------------------
# Elastic pipe made of pool slices
# ---------------------------------------------------------------------------

cdef class PipeProducer(_Producer):
    """The writing end of an elastic pipe whose bytes live in pool slices.

    ``region`` is the whole pool mapping; the geometry comes from the pool's
    validated local copy.  Only the producer resizes (``resize``).
    """

    def __init__(self, region, entry_offset, data_offset, slice_size, slice_count, max_slices):
        cdef uint64_t ack
        self._attach_pipe(region, entry_offset, data_offset, slice_size, slice_count, max_slices)
        self._seq = acl_load_acquire_u64(self._layout_seq_p)
        ack = acl_load_acquire_u64(self._layout_ack_p)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(f"pipe layout ack {ack} does not match layout {self._seq}")
        _copy_layout(self, self._geo, ack, &self._cur)
        if ack != self._seq:
            _copy_layout(self, self._geo, self._seq, &self._next)
            self._switch = self._next.start
            self._pending = True
        self._start_positions()

    cdef int _publish(self, uint64_t start, list slices) except -1:
        cdef uint8_t *slot = (self._base + self._geo.entry_offset + OFF_LAYOUT_SLOTS
                              + ((self._seq + 1) & 1) * self._geo.slot_size)
        cdef Py_ssize_t i
        (<uint64_t *>slot)[0] = start
        (<uint32_t *>(slot + 8))[0] = len(slices)
        for i in range(len(slices)):
            (<uint32_t *>(slot + LAYOUT_SLOT_HEADER))[i] = slices[i]
            self._next.slices[i] = slices[i]
        self._next.count = len(slices)
        self._next.start = start
        self._switch = start
        self._pending = True
        self._seq += 1
        acl_store_release_u64(self._layout_seq_p, self._seq)
        return 0

    def _settle(self) -> None:
        """Adopt the pending layout locally once the consumer is past it."""
        cdef Layout tmp
        if self._pending and self._last_head >= self._switch:
            tmp = self._cur
            self._cur = self._next
            self._next = tmp
            self._pending = False

    @property
    def slice_size(self) -> int:
        """Bytes in one slice of the pool."""
        return self._geo.slice_size

    @property
    def slices(self) -> list:
        """Slice indices of the newest layout, in order."""
        return _layout_list(&self._next if self._pending else &self._cur)

    def switch_complete(self) -> bool:
        """True when no resize is in flight: slices a resize dropped hold no
        unread byte and may go back to the pool."""
        self._check_usable()
        self._load_head()
        self._settle()
        return not self._pending

    def can_resize(self) -> bool:
        """True when the consumer has taken up the newest layout, so another
        resize may be published."""
        self._check_usable()
        cdef uint64_t ack = acl_load_acquire_u64(self._layout_ack_p)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(f"pipe layout ack {ack} does not match layout {self._seq}")
        return ack == self._seq and self.switch_complete()

    def resize(self, Py_ssize_t keep, added=()) -> tuple:
        """Publish a new layout: the first ``keep`` slices of the current one
        (rotated to the switch point) followed by the ``added`` slice indices.

        Returns ``(switch_position, dropped_slices)``; the dropped slices may
        be reused once ``switch_complete()`` is true.  Bytes are never lost or
        reordered: see the resizing rules in ``_ring.pxd``.
        """
        self._check_usable()
        if not self.can_resize():
            raise RuntimeError("a resize is still in flight (see can_resize())")
        added = _L.check_resize(self._cur.count, keep, added, self._geo.slice_count,
                                self._geo.max_slices)
        self._load_head()
        start, new, dropped = _L.plan_resize(_layout_list(&self._cur), self._cur.start,
                                             self._tail, keep, added, self._geo.slice_size)
        self._publish(start, new)
        self._load_head()
        self._settle()
        return start, dropped


cdef class PipeConsumer(_Consumer):
    """The reading end of an elastic pipe whose bytes live in pool slices."""

    def __init__(self, region, entry_offset, data_offset, slice_size, slice_count, max_slices):
        self._attach_pipe(region, entry_offset, data_offset, slice_size, slice_count, max_slices)
        self._seq = acl_load_acquire_u64(self._layout_ack_p)
        _copy_layout(self, self._geo, self._seq, &self._cur)
        self._head = acl_load_acquire_u64(self._head_p)
        self._before_tail_check()
        self._start_positions()

    cdef int _before_tail_check(self) except -1:
        # Called right after tail was load-acquired: a layout published
        # before that tail is visible now.
        cdef uint64_t seq = acl_load_acquire_u64(self._layout_seq_p)
        if seq == self._seq:
            return 0
        if seq != self._seq + 1:
            self._corrupt(f"pipe layout jumped from {self._seq} to {seq}")
        if not self._pending:
            _copy_layout(self, self._geo, seq, &self._next)
            if self._next.start < self._cur.start:
                self._corrupt(
                    f"pipe layout {seq} starts at {self._next.start}, before layout "
                    f"{self._seq} (at {self._cur.start})")
            self._switch = self._next.start
            self._pending = True
        return self._after_advance()

    cdef int _after_advance(self) except -1:
        cdef Layout tmp
        if self._pending and self._head >= self._switch:
            tmp = self._cur
            self._cur = self._next
            self._next = tmp
            self._pending = False
            self._seq += 1
            acl_store_release_u64(self._layout_ack_p, self._seq)
        return 0

    @property
    def slices(self) -> list:
        """Slice indices of the layout the consumer reads from now."""
        return _layout_list(&self._cur)

