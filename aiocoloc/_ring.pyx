# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Single-producer/single-consumer byte ring over shared memory (Cython core).

The layout, the trust rules and the memory-ordering argument are in
``_ring.pxd``.  ``_ring_py.py`` is the readable reference with the same API.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset
from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE,
)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from aiocoloc.errors import RingAttachError, RingClosed, RingCorrupted

__all__ = [
    "HEADER_SIZE", "MIN_CAPACITY", "LAYOUT_VERSION", "MAGIC", "LAYOUT", "IMPLEMENTATION",
    "ring_size", "format_ring", "RingProducer", "RingConsumer",
]

IMPLEMENTATION = "cython"
HEADER_SIZE = RING_HEADER_SIZE
MIN_CAPACITY = RING_MIN_CAPACITY
LAYOUT_VERSION = RING_VERSION
MAGIC = b"ACOLRING"
# Little-endian u64 view of MAGIC: the header is compared as one atomic word.
cdef uint64_t _MAGIC_U64 = int.from_bytes(MAGIC, "little")

LAYOUT = {
    "version": RING_VERSION,
    "header_size": RING_HEADER_SIZE,
    "min_capacity": RING_MIN_CAPACITY,
    "magic": MAGIC,
    "magic_offset": OFF_MAGIC,
    "version_offset": OFF_VERSION,
    "header_size_offset": OFF_HEADER_SIZE,
    "capacity_offset": OFF_CAPACITY,
    "tail_offset": OFF_TAIL,
    "producer_closed_offset": OFF_PRODUCER_CLOSED,
    "producer_waiting_offset": OFF_PRODUCER_WAITING,
    "head_offset": OFF_HEAD,
    "consumer_closed_offset": OFF_CONSUMER_CLOSED,
    "consumer_sleeping_offset": OFF_CONSUMER_SLEEPING,
}


cdef inline bint _is_pow2(uint64_t n) noexcept nogil:
    return n != 0 and (n & (n - 1)) == 0


cdef inline void _copy(void *dst, const void *src, size_t n) noexcept:
    if n >= NOGIL_COPY_THRESHOLD:
        with nogil:
            memcpy(dst, src, n)
    else:
        memcpy(dst, src, n)


cdef int _get_region(object buffer, Py_buffer *view) except -1:
    """Export ``buffer`` writable and check its size and alignment."""
    try:
        PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE)
    except BufferError as exc:
        raise RingAttachError(f"ring buffer must be writable: {exc}") from None
    except TypeError:
        raise RingAttachError(
            f"ring buffer must support the buffer protocol, not {type(buffer).__name__}"
        ) from None
    if view.len < RING_HEADER_SIZE + RING_MIN_CAPACITY:
        n = view.len
        PyBuffer_Release(view)
        raise RingAttachError(
            f"ring buffer too small: {n} bytes, a ring needs at least "
            f"{RING_HEADER_SIZE + RING_MIN_CAPACITY} ({RING_HEADER_SIZE}-byte header + "
            f"{RING_MIN_CAPACITY}-byte data)"
        )
    if (<uintptr_t>view.buf) % 8:
        addr = <uintptr_t>view.buf
        PyBuffer_Release(view)
        raise RingAttachError(
            f"ring buffer is unaligned: address {addr:#x} is not a multiple of 8"
        )
    return 0


def ring_size(capacity: int) -> int:
    """Bytes a ring with ``capacity`` data bytes occupies (header included)."""
    if capacity < RING_MIN_CAPACITY or not _is_pow2(capacity):
        raise ValueError(
            f"ring capacity must be a power of two >= {RING_MIN_CAPACITY}, got {capacity!r}"
        )
    return RING_HEADER_SIZE + capacity


def format_ring(buffer, capacity=None) -> int:
    """Write a fresh ring header into ``buffer`` and return the capacity.

    ``capacity`` defaults to the largest power of two that fits.  Positions
    start at zero; nothing must be attached to the region while it is
    formatted.
    """
    cdef Py_buffer view
    cdef uint64_t cap
    cdef uint8_t *base
    _get_region(buffer, &view)
    try:
        room = view.len - RING_HEADER_SIZE
        if capacity is None:
            cap = 1
            while cap * 2 <= <uint64_t>room:
                cap *= 2
        else:
            if capacity < RING_MIN_CAPACITY or not _is_pow2(capacity):
                raise ValueError(
                    f"ring capacity must be a power of two >= {RING_MIN_CAPACITY}, "
                    f"got {capacity!r}"
                )
            if capacity > room:
                raise RingAttachError(
                    f"ring buffer too small: {view.len} bytes cannot hold a "
                    f"{RING_HEADER_SIZE}-byte header and {capacity} data bytes"
                )
            cap = capacity
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


cdef class _RingEnd:
    """What both ends share: attaching, validation, closing, releasing."""

    def __cinit__(self, buffer):
        cdef uint64_t cap
        _get_region(buffer, &self._buf)
        self._has_buf = True
        self._base = <uint8_t *>self._buf.buf
        magic = acl_load_acquire_u64(<uint64_t *>(self._base + OFF_MAGIC))
        if magic != _MAGIC_U64:
            found = (<bytes>(<char *>self._base)[:8])
            self._drop_buffer()
            raise RingAttachError(f"not a ring: magic is {found!r}, expected {MAGIC!r}")
        version = (<uint32_t *>(self._base + OFF_VERSION))[0]
        if version != RING_VERSION:
            self._drop_buffer()
            raise RingAttachError(
                f"ring layout version {version} is not supported "
                f"(this aiocoloc speaks version {RING_VERSION})"
            )
        header_size = (<uint32_t *>(self._base + OFF_HEADER_SIZE))[0]
        if header_size != RING_HEADER_SIZE:
            self._drop_buffer()
            raise RingAttachError(
                f"ring header size {header_size} is wrong (expected {RING_HEADER_SIZE})"
            )
        cap = (<uint64_t *>(self._base + OFF_CAPACITY))[0]
        if cap < RING_MIN_CAPACITY or not _is_pow2(cap):
            self._drop_buffer()
            raise RingAttachError(
                f"ring capacity {cap} is not a power of two >= {RING_MIN_CAPACITY}"
            )
        if cap > <uint64_t>(self._buf.len - RING_HEADER_SIZE):
            n = self._buf.len
            self._drop_buffer()
            raise RingAttachError(
                f"ring buffer too small: header says capacity {cap} but the "
                f"buffer holds only {n - RING_HEADER_SIZE} data bytes"
            )
        self._capacity = cap
        self._mask = cap - 1
        self._data = self._base + RING_HEADER_SIZE
        self._tail_p = <uint64_t *>(self._base + OFF_TAIL)
        self._head_p = <uint64_t *>(self._base + OFF_HEAD)
        self._producer_closed_p = <uint32_t *>(self._base + OFF_PRODUCER_CLOSED)
        self._producer_waiting_p = <uint32_t *>(self._base + OFF_PRODUCER_WAITING)
        self._consumer_closed_p = <uint32_t *>(self._base + OFF_CONSUMER_CLOSED)
        self._consumer_sleeping_p = <uint32_t *>(self._base + OFF_CONSUMER_SLEEPING)
        self._view = memoryview(buffer).cast("B")

    def __dealloc__(self):
        self._drop_buffer()

    cdef void _drop_buffer(self) noexcept:
        if self._has_buf:
            self._has_buf = False
            self._base = NULL
            self._data = NULL
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

    @property
    def capacity(self) -> int:
        """Data bytes the ring holds (fixed at attach)."""
        return self._capacity

    @property
    def closed(self) -> bool:
        """True once this end called ``close()``."""
        return self._closed

    @property
    def corrupted(self) -> bool:
        """True once this end saw the peer break the ring's invariants."""
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


cdef class RingProducer(_RingEnd):
    """The writing end of a ring.  One producer per ring, ever at a time."""

    def __cinit__(self, buffer):
        cdef uint64_t t = acl_load_acquire_u64(self._tail_p)
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        if h > t or t - h > self._capacity:
            self._corrupted = True
            raise RingCorrupted(
                f"ring positions invalid at attach: head {h}, tail {t}, "
                f"capacity {self._capacity}"
            )
        self._tail = t
        self._last_head = h

    cdef uint64_t _load_head(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        if h < self._last_head:
            self._corrupt(f"consumer head moved backwards: {h} < {self._last_head}")
        if h > self._tail:
            self._corrupt(f"consumer head {h} is past the producer tail {self._tail}")
        self._last_head = h
        return h

    cdef Py_ssize_t _put(self, const uint8_t *src, Py_ssize_t n, bint all_or_nothing) except -1:
        cdef uint64_t free, k, off, first
        self._check_usable()
        if self._closed:
            raise RingClosed("write to a ring after its producer closed it")
        if acl_load_acquire_u32(self._consumer_closed_p):
            raise RingClosed("the ring's consumer has closed")
        # The cached head is a lower bound of the real one: reload (a cache
        # miss on the consumer's line) only when it does not leave room.
        free = self._capacity - (self._tail - self._last_head)
        if free < <uint64_t>n:
            free = self._capacity - (self._tail - self._load_head())
        if all_or_nothing and <uint64_t>n > free:
            return 0
        k = <uint64_t>n if <uint64_t>n < free else free
        if k == 0:
            return 0
        off = self._tail & self._mask
        first = self._capacity - off
        if first >= k:
            _copy(self._data + off, src, k)
        else:
            _copy(self._data + off, src, first)
            _copy(self._data, src + first, k - first)
        self._tail += k
        acl_store_release_u64(self._tail_p, self._tail)
        return k

    cdef Py_ssize_t _write(self, object data, bint all_or_nothing) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t n
        if type(data) is bytes:
            n = PyBytes_GET_SIZE(data)
            if all_or_nothing and <uint64_t>n > self._capacity:
                raise ValueError(f"{n} bytes can never fit a ring of capacity {self._capacity}")
            return self._put(<const uint8_t *>PyBytes_AS_STRING(data), n, all_or_nothing)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if all_or_nothing and <uint64_t>view.len > self._capacity:
                raise ValueError(
                    f"{view.len} bytes can never fit a ring of capacity {self._capacity}"
                )
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
        return self._capacity - (self._tail - self._load_head())

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

    def prepare_wait(self, Py_ssize_t nbytes=1) -> bool:
        """Announce that we wait for ``nbytes`` of space.

        Returns True if the caller should now sleep until the consumer rings;
        False if the space is already there (the announcement is withdrawn).
        """
        self._check_usable()
        acl_store_relaxed_u32(self._producer_waiting_p, 1)
        acl_fence_seq_cst()
        if (self._capacity - (self._tail - self._load_head()) >= <uint64_t>nbytes
                or acl_load_acquire_u32(self._consumer_closed_p)):
            acl_store_relaxed_u32(self._producer_waiting_p, 0)
            return False
        return True

    def cancel_wait(self) -> None:
        """Withdraw a ``prepare_wait`` announcement."""
        self._check_usable()
        acl_store_relaxed_u32(self._producer_waiting_p, 0)


cdef class RingConsumer(_RingEnd):
    """The reading end of a ring.  One consumer per ring, ever at a time."""

    def __cinit__(self, buffer):
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        cdef uint64_t t = acl_load_acquire_u64(self._tail_p)
        if h > t or t - h > self._capacity:
            self._corrupted = True
            raise RingCorrupted(
                f"ring positions invalid at attach: head {h}, tail {t}, "
                f"capacity {self._capacity}"
            )
        self._head = h
        self._last_tail = t

    cdef uint64_t _load_tail(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t t = acl_load_acquire_u64(self._tail_p)
        if t < self._last_tail:
            self._corrupt(f"producer tail moved backwards: {t} < {self._last_tail}")
        if t - self._head > self._capacity:
            self._corrupt(
                f"producer tail {t} is more than capacity {self._capacity} "
                f"ahead of the consumer head {self._head}"
            )
        self._last_tail = t
        return t

    cdef void _copy_out(self, uint8_t *dst, uint64_t n) noexcept nogil:
        cdef uint64_t off = self._head & self._mask
        cdef uint64_t first = self._capacity - off
        if first >= n:
            memcpy(dst, self._data + off, n)
        else:
            memcpy(dst, self._data + off, first)
            memcpy(dst + first, self._data, n - first)

    cdef void _advance(self, uint64_t n) noexcept:
        self._head += n
        acl_store_release_u64(self._head_p, self._head)

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

        Returns the count, ``None`` if the ring is empty, or 0 at EOF.
        """
        cdef Py_buffer view
        cdef uint64_t avail, k
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            avail = self._available(<uint64_t>view.len)
            if avail == 0:
                return 0 if self._at_eof() else None
            k = <uint64_t>view.len if <uint64_t>view.len < avail else avail
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

        Returns ``None`` if the ring is empty, ``b""`` at EOF.
        """
        cdef uint64_t avail, k
        cdef bytes out
        cdef uint8_t *dst
        avail = self._available(<uint64_t>n if n >= 0 else <uint64_t>-1)
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
        """A zero-copy view of up to ``n`` readable bytes, up to the wrap point.

        Nothing is consumed: call ``consume()`` when done with the view.
        Returns ``None`` if the ring is empty, an empty view at EOF.  The
        peer may not overwrite viewed bytes until they are consumed, but a
        hostile peer could: treat the contents as untrusted input.
        """
        cdef uint64_t avail, k, off
        avail = self._available(<uint64_t>n if n >= 0 else <uint64_t>-1)
        if avail == 0:
            return self._view[:0] if self._at_eof() else None
        off = self._head & self._mask
        k = self._capacity - off
        if avail < k:
            k = avail
        if 0 <= n < <Py_ssize_t>k:
            k = <uint64_t>n
        return self._view[RING_HEADER_SIZE + off:RING_HEADER_SIZE + off + k]

    def consume(self, Py_ssize_t n) -> None:
        """Mark ``n`` readable bytes as consumed (after ``peek``)."""
        cdef uint64_t avail = self._available(<uint64_t>n if n >= 0 else 0)
        if n < 0 or <uint64_t>n > avail:
            raise ValueError(f"cannot consume {n} bytes: {avail} are readable")
        self._advance(<uint64_t>n)

    def free(self) -> int:
        """Bytes the producer could write now."""
        return self._capacity - self._available(<uint64_t>-1)

    def used(self) -> int:
        """Bytes readable now."""
        return self._available(<uint64_t>-1)

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
