# The elastic pipe made of pool slices (drawn in _ring.pxd): its placement
# (where a byte lives under the current and the pending layout), formatting,
# attaching, and its two ends with the resize protocol.  The cold path --
# geometry, the layout-slot codec, resize planning -- is _ring_pipe_layout.py.
# Included by _ring.pyx; twin: _ring_py_pipe.py.

# ---------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------

cdef class _PipeGeometry:
    """A C copy of ``_ring_pipe_layout.PipeGeometry``, checked against the region."""

    def __init__(self, Py_ssize_t region_len, entry_offset, data_offset, slice_size,
                 slice_count, max_slices):
        geo = _PL.PipeGeometry.checked(region_len, entry_offset, data_offset, slice_size,
                                       slice_count, max_slices)
        self.entry_offset = geo.entry_offset
        self.data_offset = geo.data_offset
        self.slice_size = geo.slice_size
        self.slice_shift = geo.slice_shift
        self.slice_count = geo.slice_count
        self.max_slices = geo.max_slices
        self.slot_size = geo.slot_size


cdef inline Span _pipe_locate(_PipeGeometry geo, Layout *layout, uint64_t pos,
                              uint64_t want) noexcept nogil:
    cdef Span span
    cdef uint64_t rel = pos - layout.start
    cdef uint64_t off = rel & (geo.slice_size - 1)
    cdef uint64_t k = rel >> geo.slice_shift
    # layout.count >= 1 and every index < slice_count: validated on copy-in.
    cdef uint64_t index = layout.slices[k % layout.count]
    cdef uint64_t following
    span.offset = geo.data_offset + (index << geo.slice_shift) + off
    span.length = geo.slice_size - off
    # The slices that follow in the layout and in memory make one span, as
    # far as ``want`` bytes: one copy, or one view, instead of one a slice.
    while span.length < want:
        k += 1
        following = layout.slices[k % layout.count]
        if following != index + 1:
            break
        index = following
        span.length += geo.slice_size
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
    cdef const char *slot = <const char *>(end._base + geo.entry_offset + OFF_LAYOUT_SLOTS
                                           + (seq & 1) * geo.slot_size)
    cdef Py_ssize_t i
    try:
        start, slices = _PL.read_layout_slot(PyBytes_FromStringAndSize(slot, geo.slot_size),
                                             seq, geo.max_slices, geo.slice_count)
    except RingCorrupted:
        end._corrupted = True
        raise
    # read_layout_slot checked 1 <= len(slices) <= max_slices: the arrays' size.
    for i in range(len(slices)):
        into.slices[i] = slices[i]
    into.start = start
    into.count = len(slices)
    return 0


cdef uint32_t *_alloc_slices(uint64_t n) except NULL:
    cdef uint32_t *p = <uint32_t *>malloc(n * sizeof(uint32_t))
    if p == NULL:
        raise MemoryError()
    return p


cdef list _layout_list(Layout *layout):
    return [layout.slices[i] for i in range(layout.count)]


cdef int _attach_pipe(_End end, object region, object entry_offset, object data_offset,
                      object slice_size, object slice_count, object max_slices) except -1:
    """Export the pool ``region`` and bind ``end`` to the pipe entry there."""
    end._export(region)
    try:
        end._geo = _PipeGeometry(end._buf.len, entry_offset, data_offset, slice_size,
                                 slice_count, max_slices)
    except BaseException:
        end._drop_buffer()
        raise
    end._is_pipe = True
    end._cur.slices = _alloc_slices(max_slices)
    end._next.slices = _alloc_slices(max_slices)
    end._bind_cells(end._geo.entry_offset)
    end._layout_seq_p = <uint64_t *>(end._base + end._geo.entry_offset + OFF_LAYOUT_SEQ)
    end._layout_ack_p = <uint64_t *>(end._base + end._geo.entry_offset + OFF_LAYOUT_ACK)
    end._view = memoryview(region).cast("B")
    return 0


def format_pipe(buffer, entry_offset, max_slices, slices, start=0) -> None:
    """Initialise a pipe entry (offsets 48 and up) with its first layout.

    The pool calls this while it owns the entry; nothing may be attached.
    """
    cdef Py_buffer view
    cdef uint8_t *entry
    cdef bytes image
    _PL.check_first_layout(max_slices, slices)
    _get_region(buffer, &view, 0)
    try:
        size = _PL.check_pipe_entry(view.len, entry_offset, max_slices)
        image = _PL.pipe_entry(size, start, slices)
        entry = <uint8_t *>view.buf + <uint64_t>entry_offset
        memcpy(entry + OFF_LAYOUT_SEQ, PyBytes_AS_STRING(image), PyBytes_GET_SIZE(image))
        acl_store_release_u64(<uint64_t *>(entry + OFF_LAYOUT_SEQ), 0)
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------------------
# The ends
# ---------------------------------------------------------------------------

cdef class PipeProducer(_Producer):
    """The writing end of an elastic pipe whose bytes live in pool slices.

    ``region`` is the whole pool mapping; the geometry comes from the pool's
    validated local copy.  Only the producer resizes (``resize``).
    """

    def __init__(self, region, entry_offset, data_offset, slice_size, slice_count, max_slices):
        cdef uint64_t ack
        _attach_pipe(self, region, entry_offset, data_offset, slice_size, slice_count, max_slices)
        self._seq = acl_load_acquire_u64(self._layout_seq_p)
        ack = self._check_ack()
        _copy_layout(self, self._geo, ack, &self._cur)
        if ack != self._seq:
            _copy_layout(self, self._geo, self._seq, &self._next)
            self._switch = self._next.start
            self._pending = True
        self._start_positions()

    cdef uint64_t _check_ack(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t ack = acl_load_acquire_u64(self._layout_ack_p)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(_layout_ack_mismatch(ack, self._seq))
        return ack

    cdef int _publish(self, uint64_t start, list slices) except -1:
        cdef uint8_t *slot = (self._base + self._geo.entry_offset + OFF_LAYOUT_SLOTS
                              + ((self._seq + 1) & 1) * self._geo.slot_size)
        cdef bytes image = _PL.layout_slot(start, slices)
        cdef Py_ssize_t i
        memcpy(slot, PyBytes_AS_STRING(image), PyBytes_GET_SIZE(image))
        for i in range(len(slices)):
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
        return self._check_ack() == self._seq and self.switch_complete()

    def resize(self, Py_ssize_t keep, added=()) -> tuple:
        """Publish a new layout: the first ``keep`` slices of the current one
        (rotated to the switch point) followed by the ``added`` slice indices.

        Returns ``(switch_position, dropped_slices)``; the dropped slices may
        be reused once ``switch_complete()`` is true.  Bytes are never lost or
        reordered: see the resizing rules in ``_ring.pxd``.
        """
        self._check_usable()
        if not self.can_resize():
            raise RuntimeError(_RESIZE_IN_FLIGHT)
        added = _PL.check_resize(self._cur.count, keep, added, self._geo.slice_count,
                                 self._geo.max_slices)
        self._load_head()
        start, new, dropped = _PL.plan_resize(_layout_list(&self._cur), self._cur.start,
                                              self._tail, keep, added, self._geo.slice_size)
        self._publish(start, new)
        self._load_head()
        self._settle()
        return start, dropped


cdef class PipeConsumer(_Consumer):
    """The reading end of an elastic pipe whose bytes live in pool slices."""

    def __init__(self, region, entry_offset, data_offset, slice_size, slice_count, max_slices):
        _attach_pipe(self, region, entry_offset, data_offset, slice_size, slice_count, max_slices)
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
            self._corrupt(_layout_jumped(self._seq, seq))
        if not self._pending:
            _copy_layout(self, self._geo, seq, &self._next)
            if self._next.start < self._cur.start:
                self._corrupt(_layout_starts_before(seq, self._next.start, self._seq,
                                                           self._cur.start))
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
