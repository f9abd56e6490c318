"""The cold path of elastic pipes, shared by both ring implementations: entry
geometry, the layout-slot codec and resize planning.

A pipe entry and its two layout slots are drawn in ``_ring.pxd`` (with the
rules a resize follows); the offsets are ``_ring_layout``'s.  Everything here
runs when a pipe is formatted, attached or resized, or when a consumer meets
a new layout -- never per byte or per message -- so both twins share one copy
of each check, each codec and each error message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from aiocoloc._ring_layout import (
    LAYOUT_SLOT_HEADER,
    OFF_HEAD,
    OFF_LAYOUT_SEQ,
    OFF_LAYOUT_SLOTS,
    OFF_TAIL,
    is_pow2,
)
from aiocoloc.errors import RingAttachError, RingCorrupted

__all__ = [
    "PipeGeometry",
    "check_first_layout",
    "check_pipe_entry",
    "check_resize",
    "layout_slot",
    "pipe_entry",
    "pipe_entry_size",
    "plan_resize",
    "read_layout_slot",
    "slot_size",
]

# --- entries and geometry --------------------------------------------------------------


def slot_size(max_slices: int) -> int:
    """Bytes of one layout slot holding up to ``max_slices`` indices (8-aligned)."""
    return (LAYOUT_SLOT_HEADER + 4 * max_slices + 7) & ~7


def pipe_entry_size(max_slices: int) -> int:
    """Bytes of a pipe entry whose layouts hold up to ``max_slices`` slices."""
    if max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices!r}")
    return (OFF_LAYOUT_SLOTS + 2 * slot_size(max_slices) + 63) & ~63


class PipeGeometry(NamedTuple):
    """Where a pipe and its pool's slices are, checked against the region."""

    entry_offset: int
    data_offset: int
    slice_size: int
    slice_shift: int  # log2(slice_size)
    slice_count: int
    max_slices: int
    slot_size: int  # bytes of one layout slot

    @classmethod
    def checked(
        cls, region_len: int, entry: int, data: int, size: int, count: int, most: int
    ) -> PipeGeometry:
        """The geometry, or ``ValueError``/``RingAttachError`` if the region cannot hold it."""
        if size < 64 or not is_pow2(size):
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
        return cls(entry, data, size, size.bit_length() - 1, count, most, slot_size(most))


def check_first_layout(max_slices: int, slices: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``slices`` can be a pipe's first layout."""
    if not 1 <= len(slices) <= max_slices:
        raise ValueError(f"a pipe needs 1..{max_slices} slices, got {len(slices)}")


def check_pipe_entry(length: int, entry_offset: int, max_slices: int) -> int:
    """The size of a pipe entry at ``entry_offset``, or ``RingAttachError``
    unless it is 64-byte aligned and fits a region of ``length`` bytes."""
    size = pipe_entry_size(max_slices)
    if entry_offset % 64 or entry_offset + size > length:
        raise RingAttachError(f"pipe entry at {entry_offset} does not fit the region")
    return size


def pipe_entry(size: int, start: int, slices: Sequence[int]) -> bytes:
    """What ``format_pipe`` writes at offsets ``OFF_LAYOUT_SEQ`` up to ``size``
    of an entry: layout seq 0, both positions at ``start``, every flag clear,
    layout slot 0 holding ``(start, slices)`` and slot 1 empty."""
    entry = bytearray(size - OFF_LAYOUT_SEQ)
    for offset in (OFF_TAIL, OFF_HEAD):
        at = offset - OFF_LAYOUT_SEQ
        entry[at : at + 8] = start.to_bytes(8, "little")
    slot = layout_slot(start, slices)
    at = OFF_LAYOUT_SLOTS - OFF_LAYOUT_SEQ
    entry[at : at + len(slot)] = slot
    return bytes(entry)


# --- layout slots ------------------------------------------------------------------------


def layout_slot(start: int, slices: Sequence[int]) -> bytes:
    """A layout slot as the producer publishes it: 8 start, 4 count,
    4 reserved, then the slice indices (u32)."""
    count = len(slices)
    return (
        start.to_bytes(8, "little")
        + count.to_bytes(4, "little")
        + bytes(4)
        + b"".join(int(index).to_bytes(4, "little") for index in slices)
    )


def read_layout_slot(
    slot: bytes, seq: int, max_slices: int, slice_count: int
) -> tuple[int, list[int]]:
    """``(start, slices)`` of layout ``seq``, decoded from ``slot``, a copy of
    its slot taken once, so that each value is checked once and used as
    checked.  ``RingCorrupted`` unless it names 1..``max_slices`` slices,
    each in the pool of ``slice_count``."""
    count = int.from_bytes(slot[8:12], "little")
    if count < 1 or count > max_slices:
        raise RingCorrupted(f"pipe layout {seq} has {count} slices (allowed 1..{max_slices})")
    start = int.from_bytes(slot[0:8], "little")
    slices = list(struct.unpack_from(f"<{count}I", slot, LAYOUT_SLOT_HEADER))
    for index in slices:
        if index >= slice_count:
            raise RingCorrupted(f"pipe layout {seq} names slice {index} of {slice_count}")
    return start, slices


# --- resizing ------------------------------------------------------------------------------


def check_resize(
    n: int, keep: int, added: Sequence[int], slice_count: int, max_slices: int
) -> list[int]:
    """Check a resize request against a current layout of ``n`` slices in a
    pool of ``slice_count``; return the added slice indices as a list."""
    new_slices = [int(i) for i in added]
    if keep < 0 or keep > n:
        raise ValueError(f"keep must be in 0..{n}, got {keep}")
    total = keep + len(new_slices)
    if total < 1 or total > max_slices:
        raise ValueError(f"a pipe needs 1..{max_slices} slices, got {total}")
    for i in new_slices:
        if not 0 <= i < slice_count:
            raise ValueError(f"slice {i} is not in the pool ({slice_count} slices)")
    return new_slices


def plan_resize(
    current: Sequence[int], current_start: int, tail: int, keep: int, added: list[int], size: int
) -> tuple[int, list[int], list[int]]:
    """Where a checked resize takes effect: ``(switch position, new slices,
    dropped slices)`` for a layout ``current`` starting at ``current_start``."""
    # The slice boundary at or below tail: bytes already written from there
    # on sit where both layouts put them (see _ring.pxd).
    start = current_start + (tail - current_start) // size * size
    if keep == 0 and start != tail:
        raise ValueError(
            "keep must be >= 1: the bytes written since the last slice "
            "boundary stay in the first slice"
        )
    rotation = ((start - current_start) // size) % len(current)
    rotated = list(current[rotation:]) + list(current[:rotation])
    new = rotated[:keep] + added
    if len(set(new)) != len(new):
        raise ValueError("a slice cannot appear twice in a pipe")
    return start, new, rotated[keep:]
