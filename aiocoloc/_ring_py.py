"""Pure-Python reference of the shared-memory ring (same API as ``_ring``).

Slow and readable; selected with ``AIOCOLOC_NO_EXTENSIONS=1`` or when the
extension is not built.  The layout and the rules are defined in
``_ring.pxd``; the numbers below mirror it and a test checks they agree.

Python has no atomic fences: this reference relies on aligned 8-byte loads
and stores being single instructions and on x86-TSO ordering.  It is exact
within one process and between processes for data and positions; the sleep
flags lack the store-load fence, so a wake-up can be missed and callers must
bound their sleeps (the transport does).
"""

from __future__ import annotations

from typing import Any

from aiocoloc.errors import RingAttachError, RingClosed, RingCorrupted

__all__ = [
    "HEADER_SIZE",
    "LAYOUT",
    "LAYOUT_VERSION",
    "MAGIC",
    "MIN_CAPACITY",
    "RingConsumer",
    "RingProducer",
    "format_ring",
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
_OFF_TAIL = 64
_OFF_PRODUCER_CLOSED = 72
_OFF_PRODUCER_WAITING = 76
_OFF_HEAD = 128
_OFF_CONSUMER_CLOSED = 136
_OFF_CONSUMER_SLEEPING = 140

LAYOUT = {
    "version": LAYOUT_VERSION,
    "header_size": HEADER_SIZE,
    "min_capacity": MIN_CAPACITY,
    "magic": MAGIC,
    "magic_offset": _OFF_MAGIC,
    "version_offset": _OFF_VERSION,
    "header_size_offset": _OFF_HEADER_SIZE,
    "capacity_offset": _OFF_CAPACITY,
    "tail_offset": _OFF_TAIL,
    "producer_closed_offset": _OFF_PRODUCER_CLOSED,
    "producer_waiting_offset": _OFF_PRODUCER_WAITING,
    "head_offset": _OFF_HEAD,
    "consumer_closed_offset": _OFF_CONSUMER_CLOSED,
    "consumer_sleeping_offset": _OFF_CONSUMER_SLEEPING,
}


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _address(view: memoryview) -> int:
    import ctypes

    holder = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def _region(buffer: Any) -> memoryview:
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
    if len(view) < HEADER_SIZE + MIN_CAPACITY:
        n = len(view)
        view.release()
        raise RingAttachError(
            f"ring buffer too small: {n} bytes, a ring needs at least "
            f"{HEADER_SIZE + MIN_CAPACITY} ({HEADER_SIZE}-byte header + "
            f"{MIN_CAPACITY}-byte data)"
        )
    addr = _address(view)
    if addr % 8:
        view.release()
        raise RingAttachError(f"ring buffer is unaligned: address {addr:#x} is not a multiple of 8")
    return view


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


class _RingEnd:
    """What both ends share: attaching, validation, closing, releasing."""

    def __init__(self, buffer: Any) -> None:
        view = _region(buffer)
        self._view: memoryview | None = view
        self._corrupted = False
        self._closed = False
        header = view[:HEADER_SIZE]
        magic = bytes(header[_OFF_MAGIC : _OFF_MAGIC + 8])
        words = header.cast("I")
        version = words[_OFF_VERSION // 4]
        header_size = words[_OFF_HEADER_SIZE // 4]
        capacity = header.cast("Q")[_OFF_CAPACITY // 8]
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
            self.release()
            raise RingAttachError(problem)
        self._capacity: int = capacity
        self._mask = capacity - 1
        self._u64 = header.cast("Q")
        self._u32 = header.cast("I")
        self._data = view[HEADER_SIZE : HEADER_SIZE + capacity]

    # Shared cells.  Aligned single-word loads and stores.
    def _get64(self, off: int) -> int:
        return int(self._u64[off // 8])

    def _set64(self, off: int, value: int) -> None:
        self._u64[off // 8] = value

    def _get32(self, off: int) -> int:
        return int(self._u32[off // 4])

    def _set32(self, off: int, value: int) -> None:
        self._u32[off // 4] = value

    def _check_usable(self) -> None:
        if self._corrupted:
            raise RingCorrupted("ring end already saw a corrupted header")
        if self._view is None:
            raise ValueError("ring end has been released")

    def _corrupt(self, what: str) -> None:
        self._corrupted = True
        raise RingCorrupted(what)

    def _check_attach_positions(self) -> tuple[int, int]:
        head, tail = self._get64(_OFF_HEAD), self._get64(_OFF_TAIL)
        if head > tail or tail - head > self._capacity:
            self._corrupted = True
            raise RingCorrupted(
                f"ring positions invalid at attach: head {head}, tail {tail}, "
                f"capacity {self._capacity}"
            )
        return head, tail

    @property
    def capacity(self) -> int:
        """Data bytes the ring holds (fixed at attach)."""
        return self._capacity

    @property
    def closed(self) -> bool:
        """True once this end called ``close()``."""
        return self._closed

    @property
    def corrupted(self) -> bool:
        """True once this end saw the peer break the ring's invariants."""
        return self._corrupted

    @property
    def released(self) -> bool:
        """True once ``release()`` dropped the buffer."""
        return self._view is None

    def release(self) -> None:
        """Drop this end's hold on the buffer (the mapping may then close)."""
        for name in ("_data", "_u64", "_u32"):
            part = self.__dict__.pop(name, None)
            if part is not None:
                part.release()
        if self._view is not None:
            self._view.release()
            self._view = None

    def __enter__(self) -> _RingEnd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._view is not None and not self._corrupted:
            self.close()
        self.release()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class RingProducer(_RingEnd):
    """The writing end of a ring.  One producer per ring, ever at a time."""

    def __init__(self, buffer: Any) -> None:
        super().__init__(buffer)
        self._last_head, self._tail = self._check_attach_positions()

    def _load_head(self) -> int:
        head = self._get64(_OFF_HEAD)
        if head < self._last_head:
            self._corrupt(f"consumer head moved backwards: {head} < {self._last_head}")
        if head > self._tail:
            self._corrupt(f"consumer head {head} is past the producer tail {self._tail}")
        self._last_head = head
        return head

    def _write(self, data: Any, all_or_nothing: bool) -> int:
        src = memoryview(data).cast("B")
        n = len(src)
        if all_or_nothing and n > self._capacity:
            raise ValueError(f"{n} bytes can never fit a ring of capacity {self._capacity}")
        self._check_usable()
        if self._closed:
            raise RingClosed("write to a ring after its producer closed it")
        if self._get32(_OFF_CONSUMER_CLOSED):
            raise RingClosed("the ring's consumer has closed")
        # The cached head is a lower bound of the real one: reload only when
        # it does not leave room (as the Cython ring does).
        free = self._capacity - (self._tail - self._last_head)
        if free < n:
            free = self._capacity - (self._tail - self._load_head())
        if all_or_nothing and n > free:
            return 0
        k = min(n, free)
        if k == 0:
            return 0
        off = self._tail & self._mask
        first = min(k, self._capacity - off)
        self._data[off : off + first] = src[:first]
        self._data[: k - first] = src[first:k]
        self._tail += k
        self._set64(_OFF_TAIL, self._tail)
        return k

    def write(self, data: Any) -> int:
        """Copy as much of ``data`` as fits; return the number of bytes written."""
        return self._write(data, False)

    def write_all(self, data: Any) -> bool:
        """Copy all of ``data`` if it fits now, else nothing; return whether it did."""
        return self._write(data, True) != 0 or len(data) == 0

    def free(self) -> int:
        """Bytes that can be written now."""
        self._check_usable()
        return self._capacity - (self._tail - self._load_head())

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
        return self._get32(_OFF_CONSUMER_CLOSED) != 0

    def close(self) -> None:
        """Mark end of data: the consumer reads what is left, then EOF."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._set32(_OFF_PRODUCER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After writing: True if the consumer sleeps and must be rung (once)."""
        self._check_usable()
        if self._get32(_OFF_CONSUMER_SLEEPING):
            self._set32(_OFF_CONSUMER_SLEEPING, 0)
            return True
        return False

    def prepare_wait(self, nbytes: int = 1) -> bool:
        """Announce that we wait for ``nbytes`` of space; True: sleep now."""
        self._check_usable()
        self._set32(_OFF_PRODUCER_WAITING, 1)
        if self.free() >= nbytes or self._get32(_OFF_CONSUMER_CLOSED):
            self._set32(_OFF_PRODUCER_WAITING, 0)
            return False
        return True

    def cancel_wait(self) -> None:
        """Withdraw a ``prepare_wait`` announcement."""
        self._check_usable()
        self._set32(_OFF_PRODUCER_WAITING, 0)


class RingConsumer(_RingEnd):
    """The reading end of a ring.  One consumer per ring, ever at a time."""

    def __init__(self, buffer: Any) -> None:
        super().__init__(buffer)
        self._head, self._last_tail = self._check_attach_positions()

    def _load_tail(self) -> int:
        tail = self._get64(_OFF_TAIL)
        if tail < self._last_tail:
            self._corrupt(f"producer tail moved backwards: {tail} < {self._last_tail}")
        if tail - self._head > self._capacity:
            self._corrupt(
                f"producer tail {tail} is more than capacity {self._capacity} "
                f"ahead of the consumer head {self._head}"
            )
        self._last_tail = tail
        return tail

    def _available(self, wanted: int = -1) -> int:
        """Readable bytes; the cached tail is reloaded only when it does not
        cover ``wanted`` (negative: everything) or shows an empty ring."""
        self._check_usable()
        avail = self._last_tail - self._head
        if wanted < 0 or avail < wanted or avail == 0:
            avail = self._load_tail() - self._head
        return avail

    def _at_eof(self) -> bool:
        if not self._get32(_OFF_PRODUCER_CLOSED):
            return False
        return self._load_tail() == self._head

    def _copy_out(self, dst: memoryview, n: int) -> None:
        off = self._head & self._mask
        first = min(n, self._capacity - off)
        dst[:first] = self._data[off : off + first]
        dst[first:n] = self._data[: n - first]

    def _advance(self, n: int) -> None:
        self._head += n
        self._set64(_OFF_HEAD, self._head)

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
        """A zero-copy view of readable bytes up to the wrap point; see ``_ring``."""
        avail = self._available(n)
        assert self._view is not None
        if avail == 0:
            return self._view[:0] if self._at_eof() else None
        off = self._head & self._mask
        k = min(avail, self._capacity - off)
        if 0 <= n < k:
            k = n
        return self._view[HEADER_SIZE + off : HEADER_SIZE + off + k]

    def consume(self, n: int) -> None:
        """Mark ``n`` readable bytes as consumed (after ``peek``)."""
        avail = self._available(max(n, 0))
        if n < 0 or n > avail:
            raise ValueError(f"cannot consume {n} bytes: {avail} are readable")
        self._advance(n)

    def free(self) -> int:
        """Bytes the producer could write now."""
        return self._capacity - self._available()

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
        return self._get32(_OFF_PRODUCER_CLOSED) != 0

    def at_eof(self) -> bool:
        """True when the producer has closed and every byte is consumed."""
        self._check_usable()
        return self._at_eof()

    def close(self) -> None:
        """Tell the producer we read no more: its writes raise ``RingClosed``."""
        self._check_usable()
        if not self._closed:
            self._closed = True
            self._set32(_OFF_CONSUMER_CLOSED, 1)

    def wake_needed(self) -> bool:
        """After consuming: True if the producer waits for space and must be rung."""
        self._check_usable()
        if self._get32(_OFF_PRODUCER_WAITING):
            self._set32(_OFF_PRODUCER_WAITING, 0)
            return True
        return False

    def prepare_sleep(self) -> bool:
        """Announce that we sleep until data arrives; True: sleep now."""
        self._check_usable()
        self._set32(_OFF_CONSUMER_SLEEPING, 1)
        if self._load_tail() != self._head or self._get32(_OFF_PRODUCER_CLOSED):
            self._set32(_OFF_CONSUMER_SLEEPING, 0)
            return False
        return True

    def cancel_sleep(self) -> None:
        """Withdraw a ``prepare_sleep`` announcement."""
        self._check_usable()
        self._set32(_OFF_CONSUMER_SLEEPING, 0)
