"""The cold path both ring implementations share: layout numbers, region and
ring-header checks.

This module is the single source of the ring header and pipe entry offsets
(drawn and explained in ``_ring.pxd``, next to the memory ordering).  The
pure-Python reference (``_ring_py``) reads them from here; the Cython core
needs them as C constants, so ``_ring.pxd`` repeats them in an enum and
``_ring`` calls ``check_compiled_layout`` when it loads: a build that
disagrees does not import.  Everything here runs at attach or format time,
never per byte or per message, so both twins share one copy of each check
and each error message.  Pipe entries (geometry, layout slots, resize
planning) are ``_ring_pipe_layout``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiocoloc.errors import LayoutMismatch, RingAttachError

__all__ = [
    "HEADER_SIZE",
    "LAYOUT",
    "LAYOUT_SLOT_HEADER",
    "LAYOUT_VERSION",
    "MAGIC",
    "MIN_CAPACITY",
    "OFF_CAPACITY",
    "OFF_CONSUMER_CLOSED",
    "OFF_CONSUMER_SLEEPING",
    "OFF_HEAD",
    "OFF_HEADER_SIZE",
    "OFF_LAYOUT_ACK",
    "OFF_LAYOUT_SEQ",
    "OFF_LAYOUT_SLOTS",
    "OFF_MAGIC",
    "OFF_PRODUCER_CLOSED",
    "OFF_PRODUCER_WAITING",
    "OFF_TAIL",
    "OFF_VERSION",
    "check_compiled_layout",
    "check_region",
    "check_ring_header",
    "format_capacity",
    "is_pow2",
    "not_a_buffer",
    "not_writable",
    "ring_header",
    "ring_header_problem",
    "ring_size",
]

# --- the numbers (drawn in _ring.pxd) ------------------------------------------------

MAGIC = b"ACOLRING"
LAYOUT_VERSION = 1
HEADER_SIZE = 256
MIN_CAPACITY = 16

# Ring header (a ring's offsets 0..63).
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_HEADER_SIZE = 12
OFF_CAPACITY = 16
# Pipe entry (48..63; the pool owns 0..47).
OFF_LAYOUT_SEQ = 48
# Position cells (both kinds of channel).
OFF_TAIL = 64
OFF_PRODUCER_CLOSED = 72
OFF_PRODUCER_WAITING = 76
OFF_HEAD = 128
OFF_CONSUMER_CLOSED = 136
OFF_CONSUMER_SLEEPING = 140
OFF_LAYOUT_ACK = 144
# Pipe layout slots: 8 start, 4 count, 4 reserved, then u32 slice indices.
OFF_LAYOUT_SLOTS = 192
LAYOUT_SLOT_HEADER = 16

#: Every number above by name: what both implementations export as ``LAYOUT``
#: and what the compiled core is checked against.
LAYOUT: dict[str, Any] = {
    "version": LAYOUT_VERSION,
    "header_size": HEADER_SIZE,
    "min_capacity": MIN_CAPACITY,
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


def check_compiled_layout(compiled: Mapping[str, Any], module: str) -> None:
    """Raise ``LayoutMismatch`` (an ``ImportError``) unless ``compiled``, the
    layout a compiled ``module`` was built with, is ``LAYOUT``."""

    def show(layout: Mapping[str, Any], key: str) -> str:
        return repr(layout[key]) if key in layout else "nothing"

    problems = [
        f"{key}: {module} has {show(compiled, key)}, aiocoloc._ring_layout has {show(LAYOUT, key)}"
        for key in sorted(LAYOUT.keys() | compiled.keys())
        if key not in compiled or key not in LAYOUT or compiled[key] != LAYOUT[key]
    ]
    if problems:
        raise LayoutMismatch(
            f"{module} disagrees with the shared ring layout (make _ring.pxd match, then rebuild): "
            + "; ".join(problems),
            name=module,
        )


def is_pow2(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n > 0 and n & (n - 1) == 0


# --- regions -------------------------------------------------------------------------


def not_a_buffer(obj: object) -> RingAttachError:
    """The error for an object without the buffer protocol."""
    return RingAttachError(
        f"ring buffer must support the buffer protocol, not {type(obj).__name__}"
    )


def not_writable(reason: object) -> RingAttachError:
    """The error for a read-only buffer (``reason``: the buffer protocol's words)."""
    return RingAttachError(f"ring buffer must be writable: {reason}")


def check_region(length: int, address: int, minimum: int) -> None:
    """Raise ``RingAttachError`` unless a region of ``length`` bytes at
    ``address`` holds ``minimum`` bytes and is 8-byte aligned (the shared
    cells are single aligned words)."""
    if length < minimum:
        raise RingAttachError(
            f"ring buffer too small: {length} bytes, a ring needs at least "
            f"{HEADER_SIZE + MIN_CAPACITY} ({HEADER_SIZE}-byte header + "
            f"{MIN_CAPACITY}-byte data)"
        )
    if address % 8:
        raise RingAttachError(
            f"ring buffer is unaligned: address {address:#x} is not a multiple of 8"
        )


# --- contiguous rings ------------------------------------------------------------------


def _check_capacity(capacity: int) -> None:
    if capacity < MIN_CAPACITY or not is_pow2(capacity):
        raise ValueError(
            f"ring capacity must be a power of two >= {MIN_CAPACITY}, got {capacity!r}"
        )


def ring_size(capacity: int) -> int:
    """Bytes a ring with ``capacity`` data bytes occupies (header included)."""
    _check_capacity(capacity)
    return HEADER_SIZE + capacity


def format_capacity(length: int, capacity: int | None) -> int:
    """The capacity ``format_ring`` gives a ring in ``length`` bytes:
    ``capacity`` if it is valid and fits, else the largest power of two that fits."""
    room = length - HEADER_SIZE
    if capacity is None:
        return 1 << (room.bit_length() - 1)
    _check_capacity(capacity)
    if capacity > room:
        raise RingAttachError(
            f"ring buffer too small: {length} bytes cannot hold a "
            f"{HEADER_SIZE}-byte header and {capacity} data bytes"
        )
    return capacity


def ring_header_problem(
    magic: bytes, version: int, header_size: int, capacity: int, length: int
) -> str | None:
    """Why a ring header read from a region of ``length`` bytes cannot be
    attached, or None if it can."""
    if magic != MAGIC:
        return f"not a ring: magic is {magic!r}, expected {MAGIC!r}"
    if version != LAYOUT_VERSION:
        return (
            f"ring layout version {version} is not supported "
            f"(this aiocoloc speaks version {LAYOUT_VERSION})"
        )
    if header_size != HEADER_SIZE:
        return f"ring header size {header_size} is wrong (expected {HEADER_SIZE})"
    if capacity < MIN_CAPACITY or not is_pow2(capacity):
        return f"ring capacity {capacity} is not a power of two >= {MIN_CAPACITY}"
    if capacity > length - HEADER_SIZE:
        return (
            f"ring buffer too small: header says capacity {capacity} but the "
            f"buffer holds only {length - HEADER_SIZE} data bytes"
        )
    return None


def ring_header(capacity: int) -> bytes:
    """The header ``format_ring`` writes for ``capacity`` data bytes, positions
    and flags zero, but the magic zero too: the twins store ``MAGIC`` last, so
    whoever sees the magic sees a whole header."""
    header = bytearray(HEADER_SIZE)
    header[OFF_VERSION : OFF_VERSION + 4] = LAYOUT_VERSION.to_bytes(4, "little")
    header[OFF_HEADER_SIZE : OFF_HEADER_SIZE + 4] = HEADER_SIZE.to_bytes(4, "little")
    header[OFF_CAPACITY : OFF_CAPACITY + 8] = capacity.to_bytes(8, "little")
    return bytes(header)


def check_ring_header(magic: bytes, header: bytes, length: int) -> int:
    """The capacity of the ring whose ``header`` was copied from a region of
    ``length`` bytes, or ``RingAttachError`` if it cannot be attached.

    ``magic`` is the magic as loaded first (with acquire: the creator stores
    it last), ``header`` a copy of the header taken after it.
    """
    version = int.from_bytes(header[OFF_VERSION : OFF_VERSION + 4], "little")
    header_size = int.from_bytes(header[OFF_HEADER_SIZE : OFF_HEADER_SIZE + 4], "little")
    capacity = int.from_bytes(header[OFF_CAPACITY : OFF_CAPACITY + 8], "little")
    problem = ring_header_problem(magic, version, header_size, capacity, length)
    if problem is not None:
        raise RingAttachError(problem)
    return capacity
