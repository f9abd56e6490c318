"""The contiguous ring of the pure-Python channels: formatting, attaching and
its two ends (twin of ``_ring_contiguous.pxi``)."""

from __future__ import annotations

from typing import Any

from aiocoloc import _ring_layout as _L
from aiocoloc._ring_layout import HEADER_SIZE, MAGIC, OFF_MAGIC
from aiocoloc._ring_py_consumer import Consumer
from aiocoloc._ring_py_end import End, export_region
from aiocoloc._ring_py_producer import Producer

__all__ = ["RingConsumer", "RingProducer", "format_ring"]


def format_ring(buffer: Any, capacity: int | None = None) -> int:
    """Write a fresh ring header into ``buffer`` and return the capacity."""
    view = export_region(buffer)
    try:
        cap = _L.format_capacity(len(view), capacity)
        view[:HEADER_SIZE] = _L.ring_header(cap)
        view[OFF_MAGIC : OFF_MAGIC + 8] = MAGIC  # last: whoever sees it sees a header
        return cap
    finally:
        view.release()


class _ContiguousEnd(End):
    """Attaching either end of a contiguous ring."""

    def _attach_ring(self, buffer: Any) -> None:
        """Export ``buffer``, validate its ring header, bind the cells."""
        view = self._export(buffer)
        header = bytes(view[:HEADER_SIZE])
        try:
            self._capacity = _L.check_ring_header(
                header[OFF_MAGIC : OFF_MAGIC + 8], header, len(view)
            )
        except BaseException:
            self._drop_buffer()
            raise
        self._bind_cells(0, HEADER_SIZE)


class RingProducer(_ContiguousEnd, Producer):
    """The writing end of a contiguous ring."""

    def __init__(self, buffer: Any) -> None:
        self._attach_ring(buffer)
        self._start_positions()


class RingConsumer(_ContiguousEnd, Consumer):
    """The reading end of a contiguous ring."""

    def __init__(self, buffer: Any) -> None:
        self._attach_ring(buffer)
        self._start_positions()
