# The reading end, one implementation for every placement: the read paths
# (copying, zero-copy peek), EOF, and the sleep/wake flags (memory ordering:
# _ring.pxd).  Included by _ring.pyx; twin: _ring_py_consumer.py.

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
            self._corrupt(_tail_moved_backwards(t, self._last_tail))
        if t > self._limit(self._head):
            self._corrupt(_tail_too_far(t, self._limit(self._head), self._head))
        self._last_tail = t
        return t

    cdef void _copy_out(self, uint8_t *dst, uint64_t n) noexcept nogil:
        cdef uint64_t pos = self._head
        cdef Span span
        while n:
            span = self._locate(pos, n)
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
        in memory (up to the wrap point, or the end of a run of slices that
        follow each other in memory).

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
        span = self._locate(self._head, avail)
        k = _min(span.length, avail)
        if 0 <= n < <Py_ssize_t>k:
            k = <uint64_t>n
        return self._view[span.offset:span.offset + k]

    def consume(self, Py_ssize_t n) -> None:
        """Mark ``n`` readable bytes as consumed (after ``peek``)."""
        cdef uint64_t avail = self._available(<uint64_t>n if n >= 0 else 0)
        if n < 0 or <uint64_t>n > avail:
            raise ValueError(_cannot_consume(n, avail))
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

