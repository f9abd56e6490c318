"""Pure-Python reference of the shared-memory channels (same API as ``_ring``).

Slow and readable; selected with ``AIOCOLOC_NO_EXTENSIONS=1`` or when the
extension is not built.  The layouts and the rules are defined in
``_ring.pxd``; the numbers below mirror it and a test checks they agree.

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
MAGIC = b"ACOLRING"
LAYOUT_VERSION = 1
HEADER_SIZE = 256
MIN_CAPACITY = 16

_OFF_MAGIC = 0
_OFF_VERSION = 8
_OFF_HEADER_SIZE = 12
_OFF_CAPACITY = 16
_OFF_LAYOUT_SEQ = 48
_OFF_TAIL = 64
_OFF_PRODUCER_CLOSED = 72
_OFF_PRODUCER_WAITING = 76
_OFF_HEAD = 128
_OFF_CONSUMER_CLOSED = 136
_OFF_CONSUMER_SLEEPING = 140
_OFF_LAYOUT_ACK = 144
_OFF_LAYOUT_SLOTS = 192
_LAYOUT_SLOT_HEADER = 16

LAYOUT: dict[str, Any] = {
    "version": LAYOUT_VERSION,
    "header_size": HEADER_SIZE,
    "min_capacity": MIN_CAPACITY,
    "magic": MAGIC,
    "magic_offset": _OFF_MAGIC,
    "version_offset": _OFF_VERSION,
    "header_size_offset": _OFF_HEADER_SIZE,
    "capacity_offset": _OFF_CAPACITY,
    "layout_seq_offset": _OFF_LAYOUT_SEQ,
    "tail_offset": _OFF_TAIL,
    "producer_closed_offset": _OFF_PRODUCER_CLOSED,
    "producer_waiting_offset": _OFF_PRODUCER_WAITING,
    "head_offset": _OFF_HEAD,
    "consumer_closed_offset": _OFF_CONSUMER_CLOSED,
    "consumer_sleeping_offset": _OFF_CONSUMER_SLEEPING,
    "layout_ack_offset": _OFF_LAYOUT_ACK,
    "layout_slots_offset": _OFF_LAYOUT_SLOTS,
    "layout_slot_header": _LAYOUT_SLOT_HEADER,
}


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


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
        raise RingAttachError(
            f"ring buffer must support the buffer protocol, not {type(buffer).__name__}"
        ) from None
    if view.readonly:
        view.release()
        raise RingAttachError("ring buffer must be writable: Object is not writable.")
    view = view.cast("B")
    if len(view) < minimum:
        n = len(view)
        view.release()
        raise RingAttachError(
            f"ring buffer too small: {n} bytes, a ring needs at least "
            f"{HEADER_SIZE + MIN_CAPACITY} ({HEADER_SIZE}-byte header + "
            f"{MIN_CAPACITY}-byte data)"
        )
    addr = _address(view) if len(view) else 0
    if addr % 8:
        view.release()
        raise RingAttachError(f"ring buffer is unaligned: address {addr:#x} is not a multiple of 8")
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
        head, tail = self._cells.get64(_OFF_HEAD), self._cells.get64(_OFF_TAIL)
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
        head = self._cells.get64(_OFF_HEAD)
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
        if self._cells.get32(_OFF_CONSUMER_CLOSED):
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
        self._cells.set64(_OFF_TAIL, self._tail)
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
        return self._cells.get32(_OFF_CONSUMER_CLOSED) != 0

    def close(self) -> None:
        """Mark end of data: the consumer reads what is left, then EOF."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._cells.set32(_OFF_PRODUCER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After writing: True if the consumer sleeps and must be rung (once)."""
        self._check_usable()
        if self._cells.get32(_OFF_CONSUMER_SLEEPING):
            self._cells.set32(_OFF_CONSUMER_SLEEPING, 0)
            return True
        return False

    def wait_over(self) -> bool:
        """After ``prepare_wait``: True once the consumer took the
        announcement, a byte fits, or the consumer closed."""
        self._check_usable()
        return (
            self._cells.get32(_OFF_PRODUCER_WAITING) == 0
            or self.free() > 0
            or self._cells.get32(_OFF_CONSUMER_CLOSED) != 0
        )

    def prepare_wait(self, nbytes: int = 1) -> bool:
        """Announce that we wait for ``nbytes`` of space; True: sleep now."""
        self._check_usable()
        self._cells.set32(_OFF_PRODUCER_WAITING, 1)
        if self.free() >= nbytes or self._cells.get32(_OFF_CONSUMER_CLOSED):
            self._cells.set32(_OFF_PRODUCER_WAITING, 0)
            return False
        return True

    def cancel_wait(self) -> None:
        """Withdraw a ``prepare_wait`` announcement."""
        self._check_usable()
        self._cells.set32(_OFF_PRODUCER_WAITING, 0)


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
        tail = self._cells.get64(_OFF_TAIL)
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
        if not self._cells.get32(_OFF_PRODUCER_CLOSED):
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
        self._cells.set64(_OFF_HEAD, self._head)
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
        return self._cells.get32(_OFF_PRODUCER_CLOSED) != 0

    def at_eof(self) -> bool:
        """True when the producer has closed and every byte is consumed."""
        self._check_usable()
        return self._at_eof()

    def close(self) -> None:
        """Tell the producer we read no more: its writes raise ``RingClosed``."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._cells.set32(_OFF_CONSUMER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After consuming: True if the producer waits for space and must be rung."""
        self._check_usable()
        if self._cells.get32(_OFF_PRODUCER_WAITING):
            self._cells.set32(_OFF_PRODUCER_WAITING, 0)
            return True
        return False

    def sleep_over(self) -> bool:
        """After ``prepare_sleep``: True once the producer took the
        announcement, or bytes or EOF came; consumes nothing."""
        self._check_usable()
        if self._cells.get32(_OFF_CONSUMER_SLEEPING) == 0 or self._available(1):
            return True
        return self._cells.get32(_OFF_PRODUCER_CLOSED) != 0

    def prepare_sleep(self) -> bool:
        """Announce that we sleep until data arrives; True: sleep now."""
        self._check_usable()
        self._cells.set32(_OFF_CONSUMER_SLEEPING, 1)
        if self._load_tail() != self._head or self._cells.get32(_OFF_PRODUCER_CLOSED):
            self._cells.set32(_OFF_CONSUMER_SLEEPING, 0)
            return False
        return True

    def cancel_sleep(self) -> None:
        """Withdraw a ``prepare_sleep`` announcement."""
        self._check_usable()
        self._cells.set32(_OFF_CONSUMER_SLEEPING, 0)

    def spin_until_readable(self, max_ns: int) -> bool:
        """Busy-wait up to ``max_ns`` for data or EOF; True if either came."""
        self._check_usable()
        deadline = time.monotonic_ns() + max_ns
        while True:
            if self._cells.get64(_OFF_TAIL) != self._head or self._cells.get32(
                _OFF_PRODUCER_CLOSED
            ):
                return True
            if time.monotonic_ns() >= deadline:
                return False


# --- contiguous ring ------------------------------------------------------------


def ring_size(capacity: int) -> int:
    """Bytes a ring with ``capacity`` data bytes occupies (header included)."""
    if capacity < MIN_CAPACITY or not _is_pow2(capacity):
        raise ValueError(
            f"ring capacity must be a power of two >= {MIN_CAPACITY}, got {capacity!r}"
        )
    return HEADER_SIZE + capacity


def format_ring(buffer: Any, capacity: int | None = None) -> int:
    """Write a fresh ring header into ``buffer`` and return the capacity."""
    view = _region(buffer)
    try:
        room = len(view) - HEADER_SIZE
        if capacity is None:
            cap = 1 << (room.bit_length() - 1)
        else:
            if capacity < MIN_CAPACITY or not _is_pow2(capacity):
                raise ValueError(
                    f"ring capacity must be a power of two >= {MIN_CAPACITY}, got {capacity!r}"
                )
            if capacity > room:
                raise RingAttachError(
                    f"ring buffer too small: {len(view)} bytes cannot hold a "
                    f"{HEADER_SIZE}-byte header and {capacity} data bytes"
                )
            cap = capacity
        view[:HEADER_SIZE] = bytes(HEADER_SIZE)
        view[_OFF_VERSION : _OFF_VERSION + 4] = LAYOUT_VERSION.to_bytes(4, "little")
        view[_OFF_HEADER_SIZE : _OFF_HEADER_SIZE + 4] = HEADER_SIZE.to_bytes(4, "little")
        view[_OFF_CAPACITY : _OFF_CAPACITY + 8] = cap.to_bytes(8, "little")
        view[_OFF_MAGIC : _OFF_MAGIC + 8] = MAGIC
        return cap
    finally:
        view.release()


def _attach_ring(end: _End, buffer: Any) -> int:
    """Export ``buffer``, validate its ring header, bind the cells; return capacity."""
    view = end._export(buffer)
    header = bytes(view[:HEADER_SIZE])
    magic = header[_OFF_MAGIC : _OFF_MAGIC + 8]
    version = int.from_bytes(header[_OFF_VERSION : _OFF_VERSION + 4], "little")
    header_size = int.from_bytes(header[_OFF_HEADER_SIZE : _OFF_HEADER_SIZE + 4], "little")
    capacity = int.from_bytes(header[_OFF_CAPACITY : _OFF_CAPACITY + 8], "little")
    problem = None
    if magic != MAGIC:
        problem = f"not a ring: magic is {magic!r}, expected {MAGIC!r}"
    elif version != LAYOUT_VERSION:
        problem = (
            f"ring layout version {version} is not supported "
            f"(this aiocoloc speaks version {LAYOUT_VERSION})"
        )
    elif header_size != HEADER_SIZE:
        problem = f"ring header size {header_size} is wrong (expected {HEADER_SIZE})"
    elif capacity < MIN_CAPACITY or not _is_pow2(capacity):
        problem = f"ring capacity {capacity} is not a power of two >= {MIN_CAPACITY}"
    elif capacity > len(view) - HEADER_SIZE:
        problem = (
            f"ring buffer too small: header says capacity {capacity} but the "
            f"buffer holds only {len(view) - HEADER_SIZE} data bytes"
        )
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


def _slot_size(max_slices: int) -> int:
    return (_LAYOUT_SLOT_HEADER + 4 * max_slices + 7) & ~7


def pipe_entry_size(max_slices: int) -> int:
    """Bytes of a pipe entry whose layouts hold up to ``max_slices`` slices."""
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices!r}")
    return (_OFF_LAYOUT_SLOTS + 2 * _slot_size(max_slices) + 63) & ~63


class _Layout(NamedTuple):
    start: int
    slices: tuple[int, ...]


class _PipeGeometry(NamedTuple):
    entry_offset: int
    data_offset: int
    slice_size: int
    slice_count: int
    max_slices: int

    @classmethod
    def checked(
        cls, region_len: int, entry: int, data: int, size: int, count: int, most: int
    ) -> _PipeGeometry:
        if size < 64 or not _is_pow2(size):
            raise ValueError(f"slice size must be a power of two >= 64, got {size!r}")
        if most < 1 or count < 1:
            raise ValueError("a pipe needs max_slices >= 1 and a pool with slices")
        if entry % 64 or data % 64:
            raise RingAttachError("pipe entry and slices must be 64-byte aligned")
        if entry + pipe_entry_size(most) > region_len:
            raise RingAttachError(
                f"pipe entry at {entry} does not fit a region of {region_len} bytes"
            )
        if data + count * size > region_len:
            raise RingAttachError(
                f"{count} slices of {size} bytes at {data} do not fit a region of {region_len} bytes"
            )
        return cls(entry, data, size, count, most)


def format_pipe(
    buffer: Any, entry_offset: int, max_slices: int, slices: Sequence[int], start: int = 0
) -> None:
    """Initialise a pipe entry (offsets 48 and up) with its first layout."""
    if not 1 <= len(slices) <= max_slices:
        raise ValueError(f"a pipe needs 1..{max_slices} slices, got {len(slices)}")
    view = _region(buffer, 0)
    try:
        size = pipe_entry_size(max_slices)
        if entry_offset % 64 or entry_offset + size > len(view):
            raise RingAttachError(f"pipe entry at {entry_offset} does not fit the region")
        view[entry_offset + _OFF_LAYOUT_SEQ : entry_offset + size] = bytes(size - _OFF_LAYOUT_SEQ)
        cells = _Cells(view, entry_offset, size)
        cells.set64(_OFF_TAIL, start)
        cells.set64(_OFF_HEAD, start)
        cells.set64(_OFF_LAYOUT_SLOTS, start)
        cells.set32(_OFF_LAYOUT_SLOTS + 8, len(slices))
        for i, index in enumerate(slices):
            cells.set32(_OFF_LAYOUT_SLOTS + _LAYOUT_SLOT_HEADER + 4 * i, index)
        cells.release()
    finally:
        view.release()


class _PipeEnd:
    """Layout bookkeeping both pipe ends share (mixed into the end classes)."""

    _geo: _PipeGeometry
    _cells: _Cells
    _cur: _Layout
    _next: _Layout | None = None  # the pending layout, if any
    _seq = 0

    def _attach_pipe(self, end: _End, region: Any, geometry: tuple[int, ...]) -> None:
        view = end._export(region, 0)
        try:
            self._geo = _PipeGeometry.checked(len(view), *geometry)
        except BaseException:
            view.release()
            end._view = None
            raise
        end._cells = _Cells(view, self._geo.entry_offset, pipe_entry_size(self._geo.max_slices))

    def _copy_layout(self, end: _End, seq: int) -> _Layout:
        geo = self._geo
        base = _OFF_LAYOUT_SLOTS + (seq & 1) * _slot_size(geo.max_slices)
        count = self._cells.get32(base + 8)
        if count < 1 or count > geo.max_slices:
            end._corrupt(f"pipe layout {seq} has {count} slices (allowed 1..{geo.max_slices})")
        start = self._cells.get64(base)
        slices = []
        for i in range(count):
            index = self._cells.get32(base + _LAYOUT_SLOT_HEADER + 4 * i)
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
        self._seq = self._cells.get64(_OFF_LAYOUT_SEQ)
        ack = self._cells.get64(_OFF_LAYOUT_ACK)
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
        ack = self._cells.get64(_OFF_LAYOUT_ACK)
        if ack != self._seq and ack + 1 != self._seq:
            self._corrupt(f"pipe layout ack {ack} does not match layout {self._seq}")
        return ack == self._seq and self.switch_complete()

    def resize(self, keep: int, added: Sequence[int] = ()) -> tuple[int, list[int]]:
        """Publish a new layout; see the Cython core for the contract."""
        self._check_usable()
        if not self.can_resize():
            raise RuntimeError("a resize is still in flight (see can_resize())")
        current = list(self._cur.slices)
        n = len(current)
        added = [int(i) for i in added]
        if keep < 0 or keep > n:
            raise ValueError(f"keep must be in 0..{n}, got {keep}")
        if keep + len(added) < 1 or keep + len(added) > self._geo.max_slices:
            raise ValueError(
                f"a pipe needs 1..{self._geo.max_slices} slices, got {keep + len(added)}"
            )
        for i in added:
            if i >= self._geo.slice_count:
                raise ValueError(f"slice {i} is not in the pool ({self._geo.slice_count} slices)")
        size = self._geo.slice_size
        self._load_head()
        # The slice boundary at or below tail (see _ring.pxd).
        start = self._cur.start + (self._tail - self._cur.start) // size * size
        if keep == 0 and start != self._tail:
            raise ValueError(
                "keep must be >= 1: the bytes written since the last slice "
                "boundary stay in the first slice"
            )
        rotation = ((start - self._cur.start) // size) % n
        rotated = current[rotation:] + current[:rotation]
        new = rotated[:keep] + added
        if len(set(new)) != len(new):
            raise ValueError("a slice cannot appear twice in a pipe")
        base = _OFF_LAYOUT_SLOTS + ((self._seq + 1) & 1) * _slot_size(self._geo.max_slices)
        self._cells.set64(base, start)
        self._cells.set32(base + 8, len(new))
        for i, index in enumerate(new):
            self._cells.set32(base + _LAYOUT_SLOT_HEADER + 4 * i, index)
        self._next = _Layout(start, tuple(new))
        self._seq += 1
        self._cells.set64(_OFF_LAYOUT_SEQ, self._seq)
        self._load_head()
        self._settle()
        return start, rotated[keep:]


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
        self._seq = self._cells.get64(_OFF_LAYOUT_ACK)
        self._cur = self._copy_layout(self, self._seq)
        self._head = self._cells.get64(_OFF_HEAD)
        self._before_tail_check()
        self._start_positions()

    def _before_tail_check(self) -> None:
        seq = self._cells.get64(_OFF_LAYOUT_SEQ)
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
            self._cells.set64(_OFF_LAYOUT_ACK, self._seq)

    @property
    def slices(self) -> list[int]:
        """Slice indices of the layout the consumer reads from now."""
        return list(self._cur.slices)
