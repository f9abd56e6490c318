# The writing end, one implementation for every placement: the write path,
# the demand counters, and the wait/wake flags (memory ordering: _ring.pxd).
# Included by _ring.pyx; twin: _ring_py_producer.py.

cdef int _refuse_never_fits(Py_ssize_t n, uint64_t capacity) except -1:
    # Out of line, so that _write carries no code for this cold raise.
    raise ValueError(_never_fits(n, capacity))


cdef class _Producer(_End):
    """The writing end.  One producer per channel, ever at a time."""

    cdef int _start_positions(self) except -1:
        self._attach_positions(&self._last_head, &self._tail)
        return 0

    cdef uint64_t _load_head(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t h = acl_load_acquire_u64(self._head_p)
        if h < self._last_head:
            self._corrupt(_head_moved_backwards(h, self._last_head))
        if h > self._tail:
            self._corrupt(_head_past_tail(h, self._tail))
        self._last_head = h
        return h

    cdef void _copy_in(self, const uint8_t *src, uint64_t n) noexcept nogil:
        cdef uint64_t pos = self._tail
        cdef Span span
        while n:
            span = self._locate(pos, n)
            span.length = _min(span.length, n)
            memcpy(self._base + span.offset, src, span.length)
            src += span.length
            pos += span.length
            n -= span.length

    cdef Py_ssize_t _put(self, const uint8_t *src, Py_ssize_t n, bint all_or_nothing) except -1:
        cdef uint64_t free, k
        self._check_usable()
        if self._closed:
            raise RingClosed(_WRITE_AFTER_CLOSE)
        if acl_load_acquire_u32(self._consumer_closed_p):
            raise RingClosed(_CONSUMER_CLOSED)
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
                _refuse_never_fits(n, capacity)
            return self._put(<const uint8_t *>PyBytes_AS_STRING(data), n, all_or_nothing)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if all_or_nothing and <uint64_t>view.len > capacity:
                _refuse_never_fits(view.len, capacity)
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

