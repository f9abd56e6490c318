# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Single-producer/single-consumer byte channels over shared memory (Cython core).

Two placements share one producer and one consumer implementation: the
contiguous ring (``RingProducer``/``RingConsumer``) and the elastic pipe made
of pool slices (``PipeProducer``/``PipeConsumer``).  Layouts, trust rules and
the memory-ordering argument are in ``_ring.pxd``; ``_ring_py.py`` is the
readable reference with the same API.  This module holds the hot path and the
checks of what the peer writes; the cold path is plain Python shared with the
reference: ``_ring_layout.py`` (layout numbers, region and header checks),
``_ring_pipe_layout.py`` (pipe geometry, layout slots, resize planning) and
``_ring_checks.py`` (the words of every run-time error).

One extension module, one concept per included file (each the twin of one
``_ring_py_*`` module), so that every hot-path call stays a C call that the
compiler can inline:

  ``_ring_end.pxi``         what both ends share (region, cells, placement, life cycle)
  ``_ring_producer.pxi``    the writing end
  ``_ring_consumer.pxi``    the reading end
  ``_ring_contiguous.pxi``  the contiguous ring: format_ring, RingProducer/Consumer
  ``_ring_pipe.pxi``        the elastic pipe: placement, format_pipe, PipeProducer/Consumer
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE,
)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from aiocoloc import _ring_checks as _checks
from aiocoloc import _ring_layout as _L
from aiocoloc import _ring_pipe_layout as _PL
from aiocoloc._ring_layout import ring_size
from aiocoloc._ring_pipe_layout import pipe_entry_size
from aiocoloc.errors import RingClosed, RingCorrupted

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

# The words of run-time errors (_ring_checks, shared with the reference),
# cached once as C globals: a raise on a hot path then costs no dictionary
# lookup, and the hot functions no code for one.
cdef str _ALREADY_ATTACHED = _checks.ALREADY_ATTACHED
cdef str _RELEASED = _checks.RELEASED
cdef str _POISONED = _checks.POISONED
cdef str _WRITE_AFTER_CLOSE = _checks.WRITE_AFTER_CLOSE
cdef str _CONSUMER_CLOSED = _checks.CONSUMER_CLOSED
cdef str _RESIZE_IN_FLIGHT = _checks.RESIZE_IN_FLIGHT
cdef object _never_fits = _checks.never_fits
cdef object _cannot_consume = _checks.cannot_consume
cdef object _positions_at_attach = _checks.positions_at_attach
cdef object _head_moved_backwards = _checks.head_moved_backwards
cdef object _head_past_tail = _checks.head_past_tail
cdef object _tail_moved_backwards = _checks.tail_moved_backwards
cdef object _tail_too_far = _checks.tail_too_far
cdef object _layout_ack_mismatch = _checks.layout_ack_mismatch
cdef object _layout_jumped = _checks.layout_jumped
cdef object _layout_starts_before = _checks.layout_starts_before


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
# Both ends
# ---------------------------------------------------------------------------

include "_ring_end.pxi"

# ---------------------------------------------------------------------------
# The producer and the consumer: one implementation each for every placement
# ---------------------------------------------------------------------------

include "_ring_producer.pxi"
include "_ring_consumer.pxi"

# ---------------------------------------------------------------------------
# The placements: contiguous ring, elastic pipe made of pool slices
# ---------------------------------------------------------------------------

include "_ring_contiguous.pxi"
include "_ring_pipe.pxi"
