# The contiguous ring: one header, then capacity data bytes, byte p at
# data[p & (capacity - 1)] (drawn in _ring.pxd).  Formatting, attaching and
# its two ends; the header's image and checks are _ring_layout.py's.
# Included by _ring.pyx; twin: _ring_py_contiguous.py.

def format_ring(buffer, capacity=None) -> int:
    """Write a fresh ring header into ``buffer`` and return the capacity.

    ``capacity`` defaults to the largest power of two that fits.  Positions
    start at zero; nothing must be attached to the region while it is
    formatted.
    """
    cdef Py_buffer view
    cdef uint64_t cap
    cdef uint8_t *base
    cdef bytes header
    _get_region(buffer, &view, RING_HEADER_SIZE + RING_MIN_CAPACITY)
    try:
        cap = _L.format_capacity(view.len, capacity)
        header = _L.ring_header(cap)
        base = <uint8_t *>view.buf
        memcpy(base, PyBytes_AS_STRING(header), RING_HEADER_SIZE)
        # Magic last, with release: whoever sees it sees a whole header.
        acl_store_release_u64(<uint64_t *>(base + OFF_MAGIC), _MAGIC_U64)
        return cap
    finally:
        PyBuffer_Release(&view)


cdef uint64_t _attach_ring(_End end, object buffer) except 0:
    """Export ``buffer``, validate its ring header, bind the cells; return capacity."""
    cdef uint64_t magic, cap
    end._export(buffer)
    # Magic first, with acquire: the creator stores it last (format_ring).
    magic = acl_load_acquire_u64(<uint64_t *>(end._base + OFF_MAGIC))
    header = PyBytes_FromStringAndSize(<const char *>end._base, RING_HEADER_SIZE)
    try:
        cap = _L.check_ring_header(int(magic).to_bytes(8, "little"), header, end._buf.len)
    except BaseException:
        end._drop_buffer()
        raise
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
