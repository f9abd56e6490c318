"""What both ends of the pure-Python channels share (twin of ``_ring_end.pxi``):
the exported region, single-word access to the shared cells, the contiguous
ring's placement (pipes override it), poisoning, closing and releasing."""

from __future__ import annotations

import ctypes
from typing import Any, NamedTuple

from aiocoloc import _ring_checks as _checks
from aiocoloc import _ring_layout as _L
from aiocoloc._ring_layout import HEADER_SIZE, MIN_CAPACITY, OFF_HEAD, OFF_TAIL
from aiocoloc.errors import RingAttachError, RingCorrupted

__all__ = ["Cells", "End", "Span", "export_region"]


def _address(view: memoryview) -> int:
    holder = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def export_region(buffer: Any, minimum: int = HEADER_SIZE + MIN_CAPACITY) -> memoryview:
    """A writable byte view of ``buffer``, checked for size and alignment."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise _L.not_a_buffer(buffer) from None
    if view.readonly:
        view.release()
        # The words of the buffer protocol's BufferError, as the Cython core reports them.
        raise _L.not_writable("Object is not writable.")
    view = view.cast("B")
    try:
        _L.check_region(len(view), _address(view) if len(view) else 0, minimum)
    except RingAttachError:
        view.release()
        raise
    return view


class Cells:
    """Aligned single-word loads and stores of one channel's shared cells."""

    def __init__(self, view: memoryview, offset: int, size: int) -> None:
        self.u8 = view[offset : offset + size]
        self.u64 = self.u8.cast("Q")
        self.u32 = self.u8.cast("I")

    def get64(self, off: int) -> int:
        return int(self.u64[off // 8])

    def set64(self, off: int, value: int) -> None:
        self.u64[off // 8] = value

    def get32(self, off: int) -> int:
        return int(self.u32[off // 4])

    def set32(self, off: int, value: int) -> None:
        self.u32[off // 4] = value

    def read(self, off: int, size: int) -> bytes:
        """A copy of ``size`` bytes at ``off``."""
        return bytes(self.u8[off : off + size])

    def write(self, off: int, data: bytes) -> None:
        """Store ``data`` at ``off``."""
        self.u8[off : off + len(data)] = data

    def release(self) -> None:
        self.u64.release()
        self.u32.release()
        self.u8.release()


class Span(NamedTuple):
    """Where a byte position lives (see ``_ring.pxd``)."""

    offset: int  # into the exported region
    length: int  # contiguous bytes from there


class End:
    """What both ends share: the exported region, the flags, closing, releasing."""

    _view: memoryview | None = None
    _cells: Cells
    _corrupted = False
    _closed = False
    _capacity = 0

    def _export(self, buffer: Any, minimum: int = HEADER_SIZE + MIN_CAPACITY) -> memoryview:
        if self._view is not None:
            raise RuntimeError(_checks.ALREADY_ATTACHED)
        self._view = export_region(buffer, minimum)
        return self._view

    def _bind_cells(self, offset: int, size: int) -> None:
        assert self._view is not None
        self._cells = Cells(self._view, offset, size)

    def _drop_buffer(self) -> None:
        """Give up the exported region before any cell was bound (attach failed)."""
        if self._view is not None:
            self._view.release()
            self._view = None

    # The contiguous ring's placement is the default; pipes override it.
    def _locate(self, pos: int, want: int = 0) -> Span:
        off = pos & (self._capacity - 1)
        return Span(HEADER_SIZE + off, self._capacity - off)

    def _limit(self, head: int) -> int:
        return head + self._capacity

    @property
    def capacity(self) -> int:
        """Data bytes the channel holds."""
        return self._capacity

    def _check_usable(self) -> None:
        if self._corrupted:
            raise RingCorrupted(_checks.POISONED)
        if self._view is None:
            raise ValueError(_checks.RELEASED)

    def _corrupt(self, what: str) -> None:
        self._corrupted = True
        raise RingCorrupted(what)

    def _attach_positions(self) -> tuple[int, int]:
        """(head, tail) as found at attach, checked against each other."""
        head, tail = self._cells.get64(OFF_HEAD), self._cells.get64(OFF_TAIL)
        if head > tail or tail > self._limit(head):
            self._corrupt(_checks.positions_at_attach(head, tail))
        return head, tail

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
        return self._view is None

    def release(self) -> None:
        """Drop this end's hold on the buffer (the mapping may then close)."""
        if self._view is not None:
            self._cells.release()
            self._view.release()
            self._view = None

    def __enter__(self) -> End:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._view is not None and not self._corrupted:
            self.close()
        self.release()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError
