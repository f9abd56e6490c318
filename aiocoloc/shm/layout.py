"""The shared layout of a pool: where everything is, formatting and validating it.

A pool is the unit of co-residency and of trust: endpoints that map the same
pool can exchange bytes through it.  The region holds a header, a member
table (who is attached, with heartbeats), a pipe table (the elastic pipes of
connections, see ``_ring.pxd``), a slice table (which pipe owns which slice)
and then the slices themselves.  This module is the one place that layout is
defined; ``members``, ``lock`` and ``pipes`` use the offsets below.

Pool layout (version 1; all integers little-endian)
----------------------------------------------------
Header, page 0::

    0    8   magic "ACOLPOOL"
    8    4   layout version
    12   4   state: 0 blank, 1 formatting, 2 ready
    16   16  pool UUID
    32   8   region size in bytes
    40   4   slice size (power of two)      44  4  slice count
    48   4   member slots                   52  4  pipe slots
    56   4   max slices per pipe            60  4  pipe entry size
    64   8   member table offset            72  8  pipe table offset
    80   8   slice table offset             88  8  first slice offset
    96   8   lease in milliseconds
    104  4   pid of the formatting process (while state is 1)
    128  8   allocator lock: 0 free, else (member slot + 1) << 32 | member generation
    136  8   lock acquisitions (a counter)

Member entry (64 bytes)::

    0  4 state (0 free, 1 active)    4  4 generation (bumped at each join)
    8  8 heartbeat counter           16 16 endpoint id (UUID)
    32 4 pid (informational)

Pipe entry (``pipe_entry_size(max slices per pipe)`` bytes; 48 and up: ``_ring.pxd``)::

    0  4 state (0 free, 1 active,    4  4 generation (bumped at each create)
             2 closing: an end left)
    8  4 producer member slot        12 4 consumer member slot
    16 4 min slices                  20 4 max slices
    24 4 target slices (policy)      32 8 bytes offered (producer)
    40 8 time blocked on a full pipe, ns (producer)

Slice table: one u32 per slice, 0 when free, else the owning pipe slot + 1.

Rules
-----
- Everything in the tables is changed under the allocator lock, a spin lock
  in the header.  A member whose heartbeat has not moved for a lease (by the
  observer's own clock: no shared clock is needed across VMs) is dead: its
  lock is taken over, its pipes are destroyed and their slices freed.  After
  a take-over the tables are repaired (slices owned by a free pipe are
  freed), so a holder that died half-way can never wedge the pool.  An
  event loop's thread never waits for the lock (``aiocoloc.shm.lock``):
  when another member holds it, creating a pipe or joining fails fast
  (``PoolBusy``), freeing a pipe or leaving is finished by a thread of ours.
- A slice has at most one owner, set under the lock; a pipe only puts
  slices it owns in its layout and hands dropped slices back only once no
  unread byte is left in them.  So the pool is never over-committed.
- Every value read from the tables is range-checked before use; the offsets
  used come from our own arithmetic (``PoolGeometry.plan``), never from the
  region: ``validate`` insists the header agrees with it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiocoloc import ring
from aiocoloc.errors import PoolError
from aiocoloc.shm.atomic import SharedWords
from aiocoloc.shm.segments import Segment

__all__ = [
    "HEADER_SIZE",
    "MEMBER_ENTRY_SIZE",
    "POOL_MAGIC",
    "POOL_VERSION",
    "PoolConfig",
    "PoolGeometry",
    "format_pool",
    "reset_if_abandoned",
    "validate",
]

POOL_MAGIC = b"ACOLPOOL"
POOL_VERSION = 1
HEADER_SIZE = 4096
MEMBER_ENTRY_SIZE = 64

# The field offsets below (H_*, M_*, P_*) are the tables drawn above, for the
# modules of this package (the ring owns a pipe entry from offset 48 on).

# Pool states (header).
_STATE_BLANK, _STATE_FORMATTING, _STATE_READY = 0, 1, 2
# Member and pipe entry states.
FREE, ACTIVE, CLOSING = 0, 1, 2

# Header fields.
H_MAGIC = 0
H_VERSION = 8
H_STATE = 12
H_UUID = 16
H_SIZE = 32
H_SLICE_SIZE = 40
H_SLICE_COUNT = 44
H_MAX_MEMBERS = 48
H_MAX_PIPES = 52
H_MAX_SLICES_PER_PIPE = 56
H_PIPE_ENTRY_SIZE = 60
H_MEMBER_OFFSET = 64
H_PIPE_OFFSET = 72
H_SLICE_TABLE_OFFSET = 80
H_DATA_OFFSET = 88
H_LEASE_MS = 96
H_FORMATTER_PID = 104
H_LOCK = 128
H_LOCK_COUNT = 136

# Member entry fields.
M_STATE = 0
M_GENERATION = 4
M_HEARTBEAT = 8
M_ENDPOINT = 16
M_PID = 32

# Pipe entry fields (the pool's part, offsets 0..47).
P_STATE = 0
P_GENERATION = 4
P_PRODUCER = 8
P_CONSUMER = 12
P_MIN = 16
P_MAX = 20
P_TARGET = 24
P_OFFERED = 32
P_BLOCKED_NS = 40
# The channel cells the pool sets when it closes a pipe (see _ring.pxd).
PIPE_PRODUCER_CLOSED: int = ring.LAYOUT["producer_closed_offset"]
PIPE_CONSUMER_CLOSED: int = ring.LAYOUT["consumer_closed_offset"]


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class PoolConfig:
    """Knobs of a new pool.  The defaults suit a few dozen connections."""

    #: Bytes per slice: the unit pipes grow and shrink by (power of two).
    slice_size: int = 64 * 1024
    #: Endpoints (processes, VMs) that can be attached at once.
    max_members: int = 64
    #: Pipes (two per shared-memory connection) that can exist at once.
    max_pipes: int = 128
    #: The largest pipe, in slices (default 16 MiB with 64 KiB slices).
    max_slices_per_pipe: int = 256
    #: A member whose heartbeat stalls this long is dead and reclaimed.
    lease: float = 5.0


@dataclass(frozen=True)
class PoolGeometry:
    """Where everything is in a pool region; computed once, kept locally."""

    size: int
    slice_size: int
    slice_count: int
    max_members: int
    max_pipes: int
    max_slices_per_pipe: int
    pipe_entry_size: int
    member_offset: int
    pipe_offset: int
    slice_table_offset: int
    data_offset: int

    @classmethod
    def plan(cls, size: int, config: PoolConfig) -> PoolGeometry:
        """Lay out a region of ``size`` bytes; raises if nothing fits."""
        s = config.slice_size
        if s < 4096 or s & (s - 1):
            raise PoolError(f"slice size must be a power of two >= 4096, got {s}")
        if config.max_members < 2 or config.max_pipes < 1 or config.max_slices_per_pipe < 1:
            raise PoolError("a pool needs at least 2 members, 1 pipe and 1 slice per pipe")
        entry = ring.pipe_entry_size(config.max_slices_per_pipe)
        member_offset = HEADER_SIZE
        pipe_offset = _align(member_offset + config.max_members * MEMBER_ENTRY_SIZE, 64)
        slice_table_offset = _align(pipe_offset + config.max_pipes * entry, 64)
        # The slice table's own size depends on the count: bound it by size.
        upper = max(0, (size - slice_table_offset) // s)
        data_offset = _align(slice_table_offset + 4 * upper, 4096)
        count = (size - data_offset) // s if size > data_offset else 0
        if count < 1:
            raise PoolError(
                f"a pool of {size} bytes has no room for a slice of {s} bytes after "
                f"its {data_offset}-byte tables (make it larger or the tables smaller)"
            )
        return cls(
            size=size,
            slice_size=s,
            slice_count=count,
            max_members=config.max_members,
            max_pipes=config.max_pipes,
            max_slices_per_pipe=config.max_slices_per_pipe,
            pipe_entry_size=entry,
            member_offset=member_offset,
            pipe_offset=pipe_offset,
            slice_table_offset=slice_table_offset,
            data_offset=data_offset,
        )


def format_pool(region: Any, segment: Segment, g: PoolGeometry, lease: float) -> uuid.UUID:
    """Claim the blank ``region`` of ``segment`` and write a fresh pool header
    and empty tables; returns the new pool's id.  State goes to ready last,
    so attachers never see a half-written header."""
    words = SharedWords(region)
    try:
        if not words.cas32(H_STATE, _STATE_BLANK, _STATE_FORMATTING):
            raise PoolError(f"{segment.identity} is already a pool (or being formatted)")
        words.store32(H_FORMATTER_PID, os.getpid())
        pool_id = uuid.uuid4()
        region[16 : g.data_offset] = bytes(g.data_offset - 16)
        region[H_UUID : H_UUID + 16] = pool_id.bytes
        words.store64(H_SIZE, g.size)
        for field, value in (
            (H_SLICE_SIZE, g.slice_size),
            (H_SLICE_COUNT, g.slice_count),
            (H_MAX_MEMBERS, g.max_members),
            (H_MAX_PIPES, g.max_pipes),
            (H_MAX_SLICES_PER_PIPE, g.max_slices_per_pipe),
            (H_PIPE_ENTRY_SIZE, g.pipe_entry_size),
        ):
            words.store32(field, value)
        for field, value in (
            (H_MEMBER_OFFSET, g.member_offset),
            (H_PIPE_OFFSET, g.pipe_offset),
            (H_SLICE_TABLE_OFFSET, g.slice_table_offset),
            (H_DATA_OFFSET, g.data_offset),
            (H_LEASE_MS, int(lease * 1000)),
        ):
            words.store64(field, value)
        region[H_MAGIC : H_MAGIC + 8] = POOL_MAGIC
        words.store32(H_VERSION, POOL_VERSION)
        words.store32(H_STATE, _STATE_READY)
        return pool_id
    finally:
        words.release()


def reset_if_abandoned(segment: Segment) -> bool:
    """True (and the pool reset to blank) if the process formatting it is dead.

    Only meaningful for pools of this kernel: the formatter's pid is checked
    with ``kill(pid, 0)``.
    """
    region = segment.map()
    words = SharedWords(region)
    try:
        if words.load32(H_STATE) != _STATE_FORMATTING:
            return False
        try:
            os.kill(words.load32(H_FORMATTER_PID), 0)
        except ProcessLookupError:
            return bool(words.cas32(H_STATE, _STATE_FORMATTING, _STATE_BLANK))
        except PermissionError:
            pass  # alive, someone else's
        return False
    finally:
        words.release()
        region.close()


def validate(
    region: Any, segment: Segment, timeout: float
) -> tuple[PoolGeometry, uuid.UUID, float]:
    """Wait for the pool on ``region`` to be ready and check its geometry;
    returns it, the pool's id and its lease."""
    words = SharedWords(region)
    try:
        deadline = time.monotonic() + timeout
        while words.load32(H_STATE) != _STATE_READY:
            if time.monotonic() > deadline:
                state = words.load32(H_STATE)
                what = (
                    "blank (nobody formatted it)"
                    if state == _STATE_BLANK
                    else f"still being formatted by pid {words.load32(H_FORMATTER_PID)}"
                    if state == _STATE_FORMATTING
                    else f"in unknown state {state}"
                )
                raise PoolError(f"{segment.identity} is not a ready pool after {timeout} s: {what}")
            time.sleep(0.005)
        magic = bytes(region[H_MAGIC : H_MAGIC + 8])
        if magic != POOL_MAGIC:
            raise PoolError(f"{segment.identity} is not a pool: magic {magic!r}")
        version = words.load32(H_VERSION)
        if version != POOL_VERSION:
            raise PoolError(
                f"{segment.identity}: pool layout version {version} is not "
                f"supported (this aiocoloc speaks {POOL_VERSION})"
            )
        size = words.load64(H_SIZE)
        if size > len(region):
            raise PoolError(
                f"{segment.identity}: pool says {size} bytes, segment has {len(region)}"
            )
        lease = words.load64(H_LEASE_MS) / 1000
        config = PoolConfig(
            slice_size=words.load32(H_SLICE_SIZE),
            max_members=words.load32(H_MAX_MEMBERS),
            max_pipes=words.load32(H_MAX_PIPES),
            max_slices_per_pipe=words.load32(H_MAX_SLICES_PER_PIPE),
            lease=lease,
        )
        # Recompute the layout from the knobs and insist the header agrees:
        # every offset we use then comes from our own arithmetic.
        try:
            expected = PoolGeometry.plan(size, config)
        except PoolError as exc:
            raise PoolError(f"{segment.identity}: pool header is inconsistent: {exc}") from None
        found = (
            words.load32(H_SLICE_COUNT),
            words.load32(H_PIPE_ENTRY_SIZE),
            words.load64(H_MEMBER_OFFSET),
            words.load64(H_PIPE_OFFSET),
            words.load64(H_SLICE_TABLE_OFFSET),
            words.load64(H_DATA_OFFSET),
        )
        wanted = (
            expected.slice_count,
            expected.pipe_entry_size,
            expected.member_offset,
            expected.pipe_offset,
            expected.slice_table_offset,
            expected.data_offset,
        )
        if found != wanted or not 0.01 <= lease <= 3600:
            raise PoolError(
                f"{segment.identity}: pool header is inconsistent "
                f"(tables at {found}, expected {wanted}; lease {lease} s)"
            )
        return expected, uuid.UUID(bytes=bytes(region[H_UUID : H_UUID + 16])), lease
    finally:
        words.release()
