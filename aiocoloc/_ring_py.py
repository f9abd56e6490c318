"""Pure-Python reference of the shared-memory channels (same API as ``_ring``).

Slow and readable; selected with ``AIOCOLOC_NO_EXTENSIONS=1`` or when the
extension is not built.  The layouts and the rules are drawn in ``_ring.pxd``;
the numbers, the attach checks, the layout-slot codec, resize planning and the
error messages come from ``_ring_layout``, ``_ring_pipe_layout`` and
``_ring_checks``, shared with the Cython core.  Only the hot path is written
twice, one module per concept, each the twin of one of ``_ring``'s ``.pxi``
files:

  ``_ring_py_end``         what both ends share (region, cells, life cycle)
  ``_ring_py_producer``    the writing end
  ``_ring_py_consumer``    the reading end
  ``_ring_py_contiguous``  the contiguous ring: format_ring, RingProducer/Consumer
  ``_ring_py_pipe``        the elastic pipe: format_pipe, PipeProducer/Consumer

This module is the one ``ring`` imports; it only gathers them.

Python has no atomic fences: this reference relies on aligned 8-byte loads
and stores being single instructions and on x86-TSO ordering.  It is exact
within one process and between processes for data and positions; the sleep
flags lack the store-load fence, so a wake-up can be missed and callers must
bound their sleeps (the transport does).
"""

from __future__ import annotations

from aiocoloc._ring_layout import (
    HEADER_SIZE,
    LAYOUT,
    LAYOUT_VERSION,
    MAGIC,
    MIN_CAPACITY,
    ring_size,
)
from aiocoloc._ring_pipe_layout import pipe_entry_size
from aiocoloc._ring_py_contiguous import RingConsumer, RingProducer, format_ring
from aiocoloc._ring_py_pipe import PipeConsumer, PipeProducer, format_pipe

__all__ = [
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "LAYOUT",
    "LAYOUT_VERSION",
    "MAGIC",
    "MIN_CAPACITY",
    "PipeConsumer",
    "PipeProducer",
    "RingConsumer",
    "RingProducer",
    "format_pipe",
    "format_ring",
    "pipe_entry_size",
    "ring_size",
]

IMPLEMENTATION = "python"

# The public names are this module's, as ``_ring``'s are its own: their
# ``__module__`` (repr, pickling path) says where callers find them.
for _public in (RingProducer, RingConsumer, PipeProducer, PipeConsumer, format_ring, format_pipe):
    _public.__module__ = __name__
del _public
