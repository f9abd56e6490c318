# What both ends share: the exported region, the shared cells, the placement
# of a byte position (a contiguous ring's or a pipe's, see _ring.pxd), the
# positions found at attach, poisoning, closing and releasing.
# Included by _ring.pyx; twin: _ring_py_end.py.

cdef class _End:
    """What both ends share: the exported region, the flags, closing, releasing."""

    cdef int _export(self, object buffer) except -1:
        if self._has_buf:
            raise RuntimeError(_ALREADY_ATTACHED)
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
            raise RingCorrupted(_POISONED)
        if not self._has_buf:
            raise ValueError(_RELEASED)
        return 0

    cdef int _corrupt(self, str what) except -1:
        self._corrupted = True
        raise RingCorrupted(what)

    cdef int _attach_positions(self, uint64_t *head, uint64_t *tail) except -1:
        """Both positions as found at attach, checked against each other."""
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        cdef uint64_t t = acl_load_acquire_u64(self._tail_p)
        if h > t or t > self._limit(h):
            self._corrupt(_positions_at_attach(h, t))
        head[0] = h
        tail[0] = t
        return 0

    cdef Span _locate(self, uint64_t pos, uint64_t want) noexcept nogil:
        cdef Span span
        cdef uint64_t off
        if self._is_pipe:
            if self._pending:
                if pos >= self._switch:
                    return _pipe_locate(self._geo, &self._next, pos, want)
                # A span of the current layout never runs into the pending one.
                return _pipe_locate(self._geo, &self._cur, pos, _min(want, self._switch - pos))
            return _pipe_locate(self._geo, &self._cur, pos, want)
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

