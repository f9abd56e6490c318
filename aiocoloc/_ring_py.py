"""Pure-Python reference of the shared-memory channels (same API as ``_ring``).

Slow and readable; selected with ``AIOCOLOC_NO_EXTENSIONS=1`` or when the
extension is not built.  The layouts and the rules are drawn in ``_ring.pxd``;
the numbers, the attach checks and resize planning come from ``_ring_layout``,
shared with the Cython core.  Only the hot path is written twice.

Python has no atomic fences: this reference relies on aligned 8-byte loads
and stores being single instructions and on x86-TSO ordering.  It is exact
within one process and between processes for data and positions; the sleep
flags lack the store-load fence, so a wake-up can be missed and callers must
bound their sleeps (the transport does).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from aiocoloc import _ring_layout as _L
from aiocoloc._ring_layout import (
    HEADER_SIZE,
    LAYOUT,
    LAYOUT_VERSION,
    MAGIC,
    MIN_CAPACITY,
    OFF_CONSUMER_CLOSED,
    OFF_CONSUMER_SLEEPING,
    OFF_HEAD,
    OFF_LAYOUT_ACK,
    OFF_LAYOUT_SEQ,
    OFF_LAYOUT_SLOTS,
    OFF_PRODUCER_CLOSED,
    OFF_PRODUCER_WAITING,
    OFF_TAIL,
    PipeGeometry,
    pipe_entry_size,
    ring_size,
)
from aiocoloc.errors import RingAttachError, RingClosed, RingCorrupted

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


def _address(view: memoryview) -> int:
    holder = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def _region(buffer: Any, minimum: int = HEADER_SIZE + MIN_CAPACITY) -> memoryview:
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


class _Cells:
    """Aligned single-word loads and stores of one channel's shared cells."""

    def __init__(self, view: memoryview, offset: int, size: int) -> None:
        block = view[offset : offset + size]
        self.u64 = block.cast("Q")
        self.u32 = block.cast("I")
        block.release()

    def get64(self, off: int) -> int:
        return int(self.u64[off // 8])

    def set64(self, off: int, value: int) -> None:
        self.u64[off // 8] = value

    def get32(self, off: int) -> int:
        return int(self.u32[off // 4])

    def set32(self, off: int, value: int) -> None:
        self.u32[off // 4] = value

    def release(self) -> None:
        self.u64.release()
        self.u32.release()


class _Span(NamedTuple):
    offset: int  # into the exported region
    length: int  # contiguous bytes from there


# --- both ends ---------------------------------------------------------------


class _End:
    """What both ends share: the exported region, the flags, closing, releasing."""

    _view: memoryview | None = None
    _cells: _Cells
    _corrupted = False
    _closed = False

    def _export(self, buffer: Any, minimum: int = HEADER_SIZE + MIN_CAPACITY) -> memoryview:
        if self._view is not None:
            raise RuntimeError("this end is already attached")
        self._view = _region(buffer, minimum)
        return self._view

    _capacity = 0

    # The contiguous ring's placement is the default; pipes override it.
    def _locate(self, pos: int) -> _Span:
        off = pos & (self._capacity - 1)
        return _Span(HEADER_SIZE + off, self._capacity - off)

    def _limit(self, head: int) -> int:
        return head + self._capacity

    @property
    def capacity(self) -> int:
        """Data bytes the channel holds."""
        return self._capacity

    def _check_usable(self) -> None:
        if self._corrupted:
            raise RingCorrupted("ring end already saw a corrupted header")
        if self._view is None:
            raise ValueError("ring end has been released")

    def _corrupt(self, what: str) -> None:
        self._corrupted = True
        raise RingCorrupted(what)

    def _attach_positions(self) -> tuple[int, int]:
        """(head, tail) as found at attach, checked against each other."""
        head, tail = self._cells.get64(OFF_HEAD), self._cells.get64(OFF_TAIL)
        if head > tail or tail > self._limit(head):
            self._corrupt(f"ring positions invalid at attach: head {head}, tail {tail}")
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

    def __enter__(self) -> _End:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._view is not None and not self._corrupted:
            self.close()
        self.release()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


# --- the producer: one implementation for every placement ----------------------


class _Producer(_End):
    """The writing end.  One producer per channel, ever at a time."""

    _tail = 0
    _last_head = 0

    def _start_positions(self) -> None:
        self._last_head, self._tail = self._attach_positions()

    def _load_head(self) -> int:
        head = self._cells.get64(OFF_HEAD)
        if head < self._last_head:
            self._corrupt(f"consumer head moved backwards: {head} < {self._last_head}")
        if head > self._tail:
            self._corrupt(f"consumer head {head} is past the producer tail {self._tail}")
        self._last_head = head
        return head

    def _copy_in(self, src: memoryview) -> None:
        assert self._view is not None
        pos, done = self._tail, 0
        while done < len(src):
            offset, length = self._locate(pos)
            length = min(length, len(src) - done)
            self._view[offset : offset + length] = src[done : done + length]
            done += length
            pos += length

    def _write(self, data: Any, all_or_nothing: bool) -> int:
        src = memoryview(data).cast("B")
        n = len(src)
        capacity = self._limit(self._last_head) - self._last_head
        if all_or_nothing and n > capacity:
            raise ValueError(f"{n} bytes can never fit a ring of capacity {capacity}")
        self._check_usable()
        if self._closed:
            raise RingClosed("write to a ring after its producer closed it")
        if self._cells.get32(OFF_CONSUMER_CLOSED):
            raise RingClosed("the ring's consumer has closed")
        # The cached head is a lower bound of the real one: reload only when
        # it does not leave room (as the Cython core does).
        free = self._limit(self._last_head) - self._tail
        if free < n:
            free = self._limit(self._load_head()) - self._tail
        if all_or_nothing and n > free:
            self._note_blocked(True)
            return 0
        k = min(n, free)
        self._note_blocked(k < n)
        if k == 0:
            return 0
        self._offered += k
        self._copy_in(src[:k])
        self._tail += k
        self._cells.set64(OFF_TAIL, self._tail)
        return k

    _offered = 0
    _blocked_ns = 0
    _blocked_since = 0

    def _note_blocked(self, blocked: bool) -> None:
        if blocked:
            if not self._blocked_since:
                self._blocked_since = time.monotonic_ns()
        elif self._blocked_since:
            self._blocked_ns += time.monotonic_ns() - self._blocked_since
            self._blocked_since = 0

    @property
    def offered(self) -> int:
        """Bytes this producer has accepted (its demand, for resizing)."""
        return self._offered

    @property
    def blocked_ns(self) -> int:
        """Nanoseconds writes found the channel too full, the current spell included."""
        if self._blocked_since:
            return self._blocked_ns + time.monotonic_ns() - self._blocked_since
        return self._blocked_ns

    def write(self, data: Any) -> int:
        """Copy as much of ``data`` as fits; return the number of bytes written."""
        return self._write(data, False)

    def write_all(self, data: Any) -> bool:
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
        return self._cells.get32(OFF_CONSUMER_CLOSED) != 0

    def close(self) -> None:
        """Mark end of data: the consumer reads what is left, then EOF."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._cells.set32(OFF_PRODUCER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After writing: True if the consumer sleeps and must be rung (once)."""
        self._check_usable()
        if self._cells.get32(OFF_CONSUMER_SLEEPING):
            self._cells.set32(OFF_CONSUMER_SLEEPING, 0)
            return True
        return False

    def wait_over(self) -> bool:
        """After ``prepare_wait``: True once the consumer took the
        announcement, a byte fits, or the consumer closed."""
        self._check_usable()
        return (
            self._cells.get32(OFF_PRODUCER_WAITING) == 0
            or self.free() > 0
            or self._cells.get32(OFF_CONSUMER_CLOSED) != 0
        )

    def prepare_wait(self, nbytes: int = 1) -> bool:
        """Announce that we wait for ``nbytes`` of space; True: sleep now."""
        self._check_usable()
        self._cells.set32(OFF_PRODUCER_WAITING, 1)
        if self.free() >= nbytes or self._cells.get32(OFF_CONSUMER_CLOSED):
            self._cells.set32(OFF_PRODUCER_WAITING, 0)
            return False
        return True

    def cancel_wait(self) -> None:
        """Withdraw a ``prepare_wait`` announcement."""
        self._check_usable()
        self._cells.set32(OFF_PRODUCER_WAITING, 0)


# --- the consumer: one implementation for every placement ----------------------


class _Consumer(_End):
    """The reading end.  One consumer per channel, ever at a time."""

    _head = 0
    _last_tail = 0

    def _start_positions(self) -> None:
        self._head, self._last_tail = self._attach_positions()

    def _before_tail_check(self) -> None:
        pass

    def _after_advance(self) -> None:
        pass

    def _load_tail(self) -> int:
        tail = self._cells.get64(OFF_TAIL)
        self._before_tail_check()
        if tail < self._last_tail:
            self._corrupt(f"producer tail moved backwards: {tail} < {self._last_tail}")
        limit = self._limit(self._head)
        if tail > limit:
            self._corrupt(
                f"producer tail {tail} is more than capacity {limit - self._head} "
                f"ahead of the consumer head {self._head}"
            )
        self._last_tail = tail
        return tail

    def _available(self, wanted: int = -1) -> int:
        """Readable bytes; the cached tail is reloaded only when it does not
        cover ``wanted`` (negative: everything) or shows an empty channel."""
        self._check_usable()
        avail = self._last_tail - self._head
        if wanted < 0 or avail < wanted or avail == 0:
            avail = self._load_tail() - self._head
        return avail

    def _at_eof(self) -> bool:
        if not self._cells.get32(OFF_PRODUCER_CLOSED):
            return False
        return self._load_tail() == self._head

    def _copy_out(self, dst: memoryview, n: int) -> None:
        assert self._view is not None
        pos, done = self._head, 0
        while done < n:
            offset, length = self._locate(pos)
            length = min(length, n - done)
            dst[done : done + length] = self._view[offset : offset + length]
            done += length
            pos += length

    def _advance(self, n: int) -> None:
        self._head += n
        self._cells.set64(OFF_HEAD, self._head)
        self._after_advance()

    def readinto(self, buffer: Any) -> int | None:
        """Read up to ``len(buffer)`` bytes; count, ``None`` if empty, 0 at EOF."""
        dst = memoryview(buffer).cast("B")
        if dst.readonly:
            raise BufferError("Object is not writable.")
        avail = self._available(len(dst))
        if avail == 0:
            return 0 if self._at_eof() else None
        k = min(len(dst), avail)
        self._copy_out(dst, k)
        self._advance(k)
        return k

    def read(self, n: int = -1) -> bytes | None:
        """Read up to ``n`` bytes (all if negative); ``None`` if empty, ``b""`` at EOF."""
        avail = self._available(n)
        if avail == 0:
            return b"" if self._at_eof() else None
        k = avail if n < 0 or n > avail else n
        out = bytearray(k)
        self._copy_out(memoryview(out), k)
        self._advance(k)
        return bytes(out)

    def peek(self, n: int = -1) -> memoryview | None:
        """A zero-copy view of readable bytes contiguous in memory; see ``_ring``."""
        avail = self._available(n)
        assert self._view is not None
        if avail == 0:
            return self._view[:0] if self._at_eof() else None
        offset, length = self._locate(self._head)
        k = min(avail, length)
        if 0 <= n < k:
            k = n
        return self._view[offset : offset + k]

    def consume(self, n: int) -> None:
        """Mark ``n`` readable bytes as consumed (after ``peek``)."""
        avail = self._available(max(n, 0))
        if n < 0 or n > avail:
            raise ValueError(f"cannot consume {n} bytes: {avail} are readable")
        self._advance(n)

    def free(self) -> int:
        """Bytes the producer could write now."""
        used = self._available()
        return self._limit(self._head) - self._head - used

    def used(self) -> int:
        """Bytes readable now."""
        return self._available()

    @property
    def position(self) -> int:
        """Total bytes this consumer has consumed (the head)."""
        return self._head

    @property
    def peer_closed(self) -> bool:
        """True once the producer has closed its end."""
        self._check_usable()
        return self._cells.get32(OFF_PRODUCER_CLOSED) != 0

    def at_eof(self) -> bool:
        """True when the producer has closed and every byte is consumed."""
        self._check_usable()
        return self._at_eof()

    def close(self) -> None:
        """Tell the producer we read no more: its writes raise ``RingClosed``."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._cells.set32(OFF_CONSUMER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After consuming: True if the producer waits for space and must be rung."""
        self._check_usable()
        if self._cells.get32(OFF_PRODUCER_WAITING):
            self._cells.set32(OFF_PRODUCER_WAITING, 0)
            return True
        return False

    def sleep_over(self) -> bool:
        """After ``prepare_sleep``: True once the producer took the
        announcement, or bytes or EOF came; consumes nothing."""
        self._check_usable()
        if self._cells.get32(OFF_CONSUMER_SLEEPING) == 0 or self._available(1):
            return True
        return self._cells.get32(OFF_PRODUCER_CLOSED) != 0

    def prepare_sleep(self) -> bool:
        """Announce that we sleep until data arrives; True: sleep now."""
        self._check_usable()
        self._cells.set32(OFF_CONSUMER_SLEEPING, 1)
        if self._load_tail() != self._head or self._cells.get32(OFF_PRODUCER_CLOSED):
            self._cells.set32(OFF_CONSUMER_SLEEPING, 0)
            return False
        return True

    def cancel_sleep(self) -> None:
        """Withdraw a ``prepare_sleep`` announcement."""
        self._check_usable()
        self._cells.set32(OFF_CONSUMER_SLEEPING, 0)

    def spin_until_readable(self, max_ns: int) -> bool:
        """Busy-wait up to ``max_ns`` for data or EOF; True if either came."""
        self._check_usable()
        deadline = time.monotonic_ns() + max_ns
        while True:
            if self._cells.get64(OFF_TAIL) != self._head or self._cells.get32(OFF_PRODUCER_CLOSED):
                return True
            if time.monotonic_ns() >= deadline:
                return False


# --- contiguous ring ------------------------------------------------------------


def format_ring(buffer: Any, capacity: int | None = None) -> int:
    """Write a fresh ring header into ``buffer`` and return the capacity."""
    view = _region(buffer)
    try:
        cap = _L.format_capacity(len(view), capacity)
        view[:HEADER_SIZE] = bytes(HEADER_SIZE)
        view[_L.OFF_VERSION : _L.OFF_VERSION + 4] = LAYOUT_VERSION.to_bytes(4, "little")
        view[_L.OFF_HEADER_SIZE : _L.OFF_HEADER_SIZE + 4] = HEADER_SIZE.to_bytes(4, "little")
        view[_L.OFF_CAPACITY : _L.OFF_CAPACITY + 8] = cap.to_bytes(8, "little")
        view[_L.OFF_MAGIC : _L.OFF_MAGIC + 8] = MAGIC  # last: whoever sees it sees a header
        return cap
    finally:
        view.release()


def _attach_ring(end: _End, buffer: Any) -> int:
    """Export ``buffer``, validate its ring header, bind the cells; return capacity."""
    view = end._export(buffer)
    header = bytes(view[:HEADER_SIZE])
    magic = header[_L.OFF_MAGIC : _L.OFF_MAGIC + 8]
    version = int.from_bytes(header[_L.OFF_VERSION : _L.OFF_VERSION + 4], "little")
    header_size = int.from_bytes(header[_L.OFF_HEADER_SIZE : _L.OFF_HEADER_SIZE + 4], "little")
    capacity = int.from_bytes(header[_L.OFF_CAPACITY : _L.OFF_CAPACITY + 8], "little")
    problem = _L.ring_header_problem(magic, version, header_size, capacity, len(view))
    if problem is not None:
        view.release()
        end._view = None
        raise RingAttachError(problem)
    end._cells = _Cells(view, 0, HEADER_SIZE)
    return capacity


class RingProducer(_Producer):
    """The writing end of a contiguous ring."""

    def __init__(self, buffer: Any) -> None:
        self._capacity = _attach_ring(self, buffer)
        self._start_positions()


class RingConsumer(_Consumer):
    """The reading end of a contiguous ring."""

    def __init__(self, buffer: Any) -> None:
        self._capacity = _attach_ring(self, buffer)
        self._start_positions()


# --- elastic pipe made of pool slices ---------------------------------------------


class _Layout(NamedTuple):
    start: int
    slices: tuple[int, ...]


def format_pipe(
    buffer: Any, entry_offset: int, max_slices: int, slices: Sequence[int], start: int = 0
) -> None:
    """Initialise a pipe entry (offsets 48 and up) with its first layout."""
    _L.check_first_layout(max_slices, slices)
    view = _region(buffer, 0)
    try:
        size = _L.check_pipe_entry(len(view), entry_offset, max_slices)
        view[entry_offset + OFF_LAYOUT_SEQ : entry_offset + size] = bytes(size - OFF_LAYOUT_SEQ)
        cells = _Cells(view, entry_offset, size)
        cells.set64(OFF_TAIL, start)
        cells.set64(OFF_HEAD, start)
        cells.set64(OFF_LAYOUT_SLOTS, start)
        cells.set32(OFF_LAYOUT_SLOTS + 8, len(slices))
        for i, index in enumerate(slices):
            cells.set32(OFF_LAYOUT_SLOTS + _L.LAYOUT_SLOT_HEADER + 4 * i, index)
        cells.release()
    finally:
        view.release()


class _PipeEnd:
    """Layout bookkeeping both pipe ends share (mixed into the end classes)."""

    _geo: PipeGeometry
    _cells: _Cells
    _cur: _Layout
    _next: _Layout | None = None  # the pending layout, if any
    _seq = 0

    def _attach_pipe(self, end: _End, region: Any, geometry: tuple[int, ...]) -> None:
        view = end._export(region, 0)
        try:
            self._geo = PipeGeometry.checked(len(view), *geometry)
        except BaseException:
            view.release()
            end._view = None
            raise
        end._cells = _Cells(view, self._geo.entry_offset, pipe_entry_size(self._geo.max_slices))

    def _copy_layout(self, end: _End, seq: int) -> _Layout:
        geo = self._geo
        base = OFF_LAYOUT_SLOTS + (seq & 1) * geo.slot_size
        count = self._cells.get32(base + 8)
        if count < 1 or count > geo.max_slices:
            end._corrupt(f"pipe layout {seq} has {count} slices (allowed 1..{geo.max_slices})")
        start = self._cells.get64(base)
        slices = []
        for i in range(count):
            index = self._cells.get32(base + _L.LAYOUT_SLOT_HEADER + 4 * i)
            if index >= geo.slice_count:
                end._corrupt(f"pipe layout {seq} names slice {index} of {geo.slice_count}")
            slices.append(index)
        return _Layout(start, tuple(slices))

    def _locate(self, pos: int) -> _Span:
        layout = self._next if self._next is not None and pos >= self._next.start else self._cur
        size = self._geo.slice_size
        rel = pos - layout.start
        index = layout.slices[(rel // size) % len(layout.slices)]
        off = rel % size
        return _Span(self._geo.data_offset + index * size + off, size - off)

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


class PipeProducer(_PipeEnd, _Producer):
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
        self._attach_pipe(self, region, geometry)
        self._seq = self._cells.get64(OFF_LAYOUT_SEQ)
        ack = self._cells.get64(OFF_LAYOUT_ACK)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(f"pipe layout ack {ack} does not match layout {self._seq}")
        self._cur = self._copy_layout(self, ack)
        if ack != self._seq:
            self._next = self._copy_layout(self, self._seq)
        self._start_positions()

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
        ack = self._cells.get64(OFF_LAYOUT_ACK)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(f"pipe layout ack {ack} does not match layout {self._seq}")
        return ack == self._seq and self.switch_complete()

    def resize(self, keep: int, added: Sequence[int] = ()) -> tuple[int, list[int]]:
        """Publish a new layout; see the Cython core for the contract."""
        self._check_usable()
        if not self.can_resize():
            raise RuntimeError("a resize is still in flight (see can_resize())")
        current = self._cur.slices
        new_slices = _L.check_resize(
            len(current), keep, added, self._geo.slice_count, self._geo.max_slices
        )
        self._load_head()
        start, new, dropped = _L.plan_resize(
            current, self._cur.start, self._tail, keep, new_slices, self._geo.slice_size
        )
        base = OFF_LAYOUT_SLOTS + ((self._seq + 1) & 1) * self._geo.slot_size
        self._cells.set64(base, start)
        self._cells.set32(base + 8, len(new))
        for i, index in enumerate(new):
            self._cells.set32(base + _L.LAYOUT_SLOT_HEADER + 4 * i, index)
        self._next = _Layout(start, tuple(new))
        self._seq += 1
        self._cells.set64(OFF_LAYOUT_SEQ, self._seq)
        self._load_head()
        self._settle()
        return start, dropped


class PipeConsumer(_PipeEnd, _Consumer):
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
        self._attach_pipe(self, region, geometry)
        self._seq = self._cells.get64(OFF_LAYOUT_ACK)
        self._cur = self._copy_layout(self, self._seq)
        self._head = self._cells.get64(OFF_HEAD)
        self._before_tail_check()
        self._start_positions()

    def _before_tail_check(self) -> None:
        seq = self._cells.get64(OFF_LAYOUT_SEQ)
        if seq == self._seq:
            return
        if seq != self._seq + 1:
            self._corrupt(f"pipe layout jumped from {self._seq} to {seq}")
        if self._next is None:
            layout = self._copy_layout(self, seq)
            if layout.start < self._cur.start:
                self._corrupt(
                    f"pipe layout {seq} starts at {layout.start}, before layout "
                    f"{self._seq} (at {self._cur.start})"
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
