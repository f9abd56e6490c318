"""The elastic pipe of the pure-Python channels: its placement in pool slices,
formatting, and its two ends with the resize protocol (twin of
``_ring_pipe.pxi``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from aiocoloc import _ring_checks as _checks
from aiocoloc._ring_layout import OFF_HEAD, OFF_LAYOUT_ACK, OFF_LAYOUT_SEQ, OFF_LAYOUT_SLOTS
from aiocoloc._ring_pipe_layout import (
    PipeGeometry,
    check_first_layout,
    check_pipe_entry,
    check_resize,
    layout_slot,
    pipe_entry,
    pipe_entry_size,
    plan_resize,
    read_layout_slot,
)
from aiocoloc._ring_py_consumer import Consumer
from aiocoloc._ring_py_end import End, Span, export_region
from aiocoloc._ring_py_producer import Producer
from aiocoloc.errors import RingCorrupted

__all__ = ["PipeConsumer", "PipeProducer", "format_pipe"]


class _Layout(NamedTuple):
    start: int
    slices: tuple[int, ...]


def format_pipe(
    buffer: Any, entry_offset: int, max_slices: int, slices: Sequence[int], start: int = 0
) -> None:
    """Initialise a pipe entry (offsets 48 and up) with its first layout."""
    check_first_layout(max_slices, slices)
    view = export_region(buffer, 0)
    try:
        size = check_pipe_entry(len(view), entry_offset, max_slices)
        view[entry_offset + OFF_LAYOUT_SEQ : entry_offset + size] = pipe_entry(size, start, slices)
    finally:
        view.release()


class _PipeEnd(End):
    """Layout bookkeeping both pipe ends share: attaching, copying a published
    layout in, and the placement of bytes under the current and pending layouts."""

    _geo: PipeGeometry
    _cur: _Layout
    _next: _Layout | None = None  # the pending layout, if any
    _seq = 0

    def _attach_pipe(self, region: Any, geometry: tuple[int, ...]) -> None:
        view = self._export(region, 0)
        try:
            self._geo = PipeGeometry.checked(len(view), *geometry)
        except BaseException:
            self._drop_buffer()
            raise
        self._bind_cells(self._geo.entry_offset, pipe_entry_size(self._geo.max_slices))

    def _copy_layout(self, seq: int) -> _Layout:
        geo = self._geo
        slot = self._cells.read(OFF_LAYOUT_SLOTS + (seq & 1) * geo.slot_size, geo.slot_size)
        try:
            start, slices = read_layout_slot(slot, seq, geo.max_slices, geo.slice_count)
        except RingCorrupted:
            self._corrupted = True
            raise
        return _Layout(start, tuple(slices))

    def _locate(self, pos: int, want: int = 0) -> Span:
        layout = self._next if self._next is not None and pos >= self._next.start else self._cur
        if layout is self._cur and self._next is not None:
            want = min(want, self._next.start - pos)  # never into the pending layout
        size = self._geo.slice_size
        rel = pos - layout.start
        k = rel // size
        index = layout.slices[k % len(layout.slices)]
        off = rel % size
        offset = self._geo.data_offset + index * size + off
        length = size - off
        # Slices that follow in the layout and in memory: one span, as far as wanted.
        while length < want:
            k += 1
            following = layout.slices[k % len(layout.slices)]
            if following != index + 1:
                break
            index = following
            length += size
        return Span(offset, length)

    def _limit(self, head: int) -> int:
        size = self._geo.slice_size
        cur = len(self._cur.slices) * size
        if self._next is None:
            return head + cur
        nxt = len(self._next.slices) * size
        if head < self._next.start:
            return min(head + cur, self._next.start + nxt)
        return head + nxt

    @property
    def capacity(self) -> int:
        """Bytes the pipe holds under the newest layout this end knows."""
        layout = self._next if self._next is not None else self._cur
        return len(layout.slices) * self._geo.slice_size


class PipeProducer(_PipeEnd, Producer):
    """The writing end of an elastic pipe whose bytes live in pool slices."""

    def __init__(
        self,
        region: Any,
        entry_offset: int,
        data_offset: int,
        slice_size: int,
        slice_count: int,
        max_slices: int,
    ) -> None:
        geometry = (entry_offset, data_offset, slice_size, slice_count, max_slices)
        self._attach_pipe(region, geometry)
        self._seq = self._cells.get64(OFF_LAYOUT_SEQ)
        ack = self._check_ack()
        self._cur = self._copy_layout(ack)
        if ack != self._seq:
            self._next = self._copy_layout(self._seq)
        self._start_positions()

    def _check_ack(self) -> int:
        """The layout the consumer acknowledged: ours, or the one before."""
        ack = self._cells.get64(OFF_LAYOUT_ACK)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(_checks.layout_ack_mismatch(ack, self._seq))
        return ack

    def _settle(self) -> None:
        if self._next is not None and self._last_head >= self._next.start:
            self._cur, self._next = self._next, None

    @property
    def slice_size(self) -> int:
        """Bytes in one slice of the pool."""
        return self._geo.slice_size

    @property
    def slices(self) -> list[int]:
        """Slice indices of the newest layout, in order."""
        return list((self._next or self._cur).slices)

    def switch_complete(self) -> bool:
        """True when no resize is in flight (dropped slices may be reused)."""
        self._check_usable()
        self._load_head()
        self._settle()
        return self._next is None

    def can_resize(self) -> bool:
        """True when the consumer has taken up the newest layout."""
        self._check_usable()
        return self._check_ack() == self._seq and self.switch_complete()

    def resize(self, keep: int, added: Sequence[int] = ()) -> tuple[int, list[int]]:
        """Publish a new layout; see the Cython core for the contract."""
        self._check_usable()
        if not self.can_resize():
            raise RuntimeError(_checks.RESIZE_IN_FLIGHT)
        current = self._cur.slices
        new_slices = check_resize(
            len(current), keep, added, self._geo.slice_count, self._geo.max_slices
        )
        self._load_head()
        start, new, dropped = plan_resize(
            current, self._cur.start, self._tail, keep, new_slices, self._geo.slice_size
        )
        slot = OFF_LAYOUT_SLOTS + ((self._seq + 1) & 1) * self._geo.slot_size
        self._cells.write(slot, layout_slot(start, new))
        self._next = _Layout(start, tuple(new))
        self._seq += 1
        self._cells.set64(OFF_LAYOUT_SEQ, self._seq)
        self._load_head()
        self._settle()
        return start, dropped


class PipeConsumer(_PipeEnd, Consumer):
    """The reading end of an elastic pipe whose bytes live in pool slices."""

    def __init__(
        self,
        region: Any,
        entry_offset: int,
        data_offset: int,
        slice_size: int,
        slice_count: int,
        max_slices: int,
    ) -> None:
        geometry = (entry_offset, data_offset, slice_size, slice_count, max_slices)
        self._attach_pipe(region, geometry)
        self._seq = self._cells.get64(OFF_LAYOUT_ACK)
        self._cur = self._copy_layout(self._seq)
        self._head = self._cells.get64(OFF_HEAD)
        self._before_tail_check()
        self._start_positions()

    def _before_tail_check(self) -> None:
        seq = self._cells.get64(OFF_LAYOUT_SEQ)
        if seq == self._seq:
            return
        if seq != self._seq + 1:
            self._corrupt(_checks.layout_jumped(self._seq, seq))
        if self._next is None:
            layout = self._copy_layout(seq)
            if layout.start < self._cur.start:
                self._corrupt(
                    _checks.layout_starts_before(seq, layout.start, self._seq, self._cur.start)
                )
            self._next = layout
        self._after_advance()

    def _after_advance(self) -> None:
        if self._next is not None and self._head >= self._next.start:
            self._cur, self._next = self._next, None
            self._seq += 1
            self._cells.set64(OFF_LAYOUT_ACK, self._seq)

    @property
    def slices(self) -> list[int]:
        """Slice indices of the layout the consumer reads from now."""
        return list(self._cur.slices)
