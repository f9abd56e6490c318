"""Shared-memory pools: one mapped region that co-located endpoints share.

A pool is the unit of co-residency and of trust: endpoints that map the same
pool can exchange bytes through it.  The region holds a header, a member
table (who is attached, with heartbeats), a pipe table (the elastic pipes of
connections, see ``_ring.pxd``), a slice table (which pipe owns which slice)
and then the slices themselves.

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
  event loop's thread never waits for the lock (``aiocoloc.pool_lock``):
  when another member holds it, creating a pipe or joining fails fast
  (``PoolBusy``), freeing a pipe or leaving is finished by a thread of ours.
- A slice has at most one owner, set under the lock; a pipe only puts
  slices it owns in its layout and hands dropped slices back only once no
  unread byte is left in them.  So the pool is never over-committed.
- Every value read from the tables is range-checked before use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiocoloc import ring
from aiocoloc.atomic import SharedWords, atomics_are_process_safe
from aiocoloc.errors import PoolBusy, PoolCorrupted, PoolError, PoolExhausted, SegmentError
from aiocoloc.pool_lock import BACKGROUND_LOCK_WAIT, AllocatorLock, on_event_loop
from aiocoloc.segments import PosixShmSegment, Segment, UnlinkPolicy

__all__ = [
    "POOL_MAGIC",
    "POOL_VERSION",
    "PipeHandle",
    "PipeInfo",
    "Pool",
    "PoolConfig",
    "PoolGeometry",
]

_log = logging.getLogger("aiocoloc.pool")

POOL_MAGIC = b"ACOLPOOL"
POOL_VERSION = 1
HEADER_SIZE = 4096
MEMBER_ENTRY_SIZE = 64
#: Seconds a lock holder must look gone (slot freed or reused) before it is
#: taken over: a member leaving frees its slot just before it unlocks.
HOLDER_GONE_GRACE = 0.05
#: Seconds between the pool thread's tries to free pipes that an event loop
#: could not free at once (``destroy_pipe``).
DEFERRED_RETRY = 0.01

_STATE_BLANK, _STATE_FORMATTING, _STATE_READY = 0, 1, 2
_FREE, _ACTIVE, _CLOSING = 0, 1, 2

# Header fields.
_H_MAGIC = 0
_H_VERSION = 8
_H_STATE = 12
_H_UUID = 16
_H_SIZE = 32
_H_SLICE_SIZE = 40
_H_SLICE_COUNT = 44
_H_MAX_MEMBERS = 48
_H_MAX_PIPES = 52
_H_MAX_SLICES_PER_PIPE = 56
_H_PIPE_ENTRY_SIZE = 60
_H_MEMBER_OFFSET = 64
_H_PIPE_OFFSET = 72
_H_SLICE_TABLE_OFFSET = 80
_H_DATA_OFFSET = 88
_H_LEASE_MS = 96
_H_FORMATTER_PID = 104
_H_LOCK = 128
_H_LOCK_COUNT = 136

# Member entry fields.
_M_STATE = 0
_M_GENERATION = 4
_M_HEARTBEAT = 8
_M_ENDPOINT = 16
_M_PID = 32

# Pipe entry fields (the pool's part, offsets 0..47).
_P_STATE = 0
_P_GENERATION = 4
_P_PRODUCER = 8
_P_CONSUMER = 12
_P_MIN = 16
_P_MAX = 20
_P_TARGET = 24
_P_OFFERED = 32
_P_BLOCKED_NS = 40
# The channel cells the pool sets when it closes a pipe (see _ring.pxd).
_PIPE_PRODUCER_CLOSED: int = ring.LAYOUT["producer_closed_offset"]
_PIPE_CONSUMER_CLOSED: int = ring.LAYOUT["consumer_closed_offset"]


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _positions(table: list[int], value: int, limit: int | None = None) -> list[int]:
    """Indices of ``value`` in ``table`` (at most ``limit``), searched in C:
    a pool's slice table has a thousand entries and more."""
    found: list[int] = []
    index = -1
    while limit is None or len(found) < limit:
        try:
            index = table.index(value, index + 1)
        except ValueError:
            break
        found.append(index)
    return found


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


# Value types read many times a second for every pipe (the resizer keys its
# tables by handle): named tuples, whose construction and hash are C code.
class PipeHandle(NamedTuple):
    """Names one pipe of a pool: its slot, and the generation it was created in."""

    slot: int
    generation: int


class PipeInfo(NamedTuple):
    """A snapshot of one pipe's bookkeeping."""

    handle: PipeHandle
    producer: int
    consumer: int
    min_slices: int
    max_slices: int
    target_slices: int
    owned_slices: int
    offered_bytes: int
    blocked_ns: int


class _Observed:
    """What this process last saw of another member's heartbeat, and when."""

    __slots__ = ("counter", "generation", "since")

    def __init__(self, generation: int, counter: int, since: float) -> None:
        self.generation = generation
        self.counter = counter
        self.since = since


class Pool:
    """This process's membership of a shared-memory pool.

    Create one with ``Pool.create`` (format a fresh segment), ``Pool.attach``
    (an existing one) or ``Pool.open_posix`` (create-or-attach a named POSIX
    pool, race-free).  The pool joins as a member, heartbeats from a daemon
    thread and reclaims dead members; ``close()`` leaves it.
    """

    def __init__(
        self,
        segment: Segment,
        region: Any,
        geometry: PoolGeometry,
        pool_id: uuid.UUID,
        lease: float,
        *,
        close_segment: bool,
    ) -> None:
        self.segment = segment
        self.geometry = geometry
        self.id = pool_id
        self.lease = lease
        self._region: Any = region
        self._words = SharedWords(region)
        self._close_segment = close_segment
        self._allocator = AllocatorLock(
            self._words,
            _H_LOCK,
            _H_LOCK_COUNT,
            lease,
            holder_gone=self._holder_gone,
            repair=self._repair,
            name=str(pool_id),
        )
        self._observed: dict[int, _Observed] = {}
        self._gone_seen: tuple[tuple[int, int], float] | None = None
        self._ends: weakref.WeakSet[Any] = weakref.WeakSet()
        # Pipes an event loop could not free at once (the lock was busy):
        # the pool's thread frees them.
        self._deferred: list[PipeHandle] = []
        self._closed = False
        self._leaving = False
        self.endpoint_id = uuid.uuid4()
        if not atomics_are_process_safe():
            _log.warning(
                "pool %s: compiled atomics unavailable (AIOCOLOC_NO_EXTENSIONS?); "
                "the pool is only safe within this process",
                pool_id,
            )
        try:
            self.slot, self.generation = self._join()
        except BaseException:
            self._words.release()
            raise
        self._stop = threading.Event()
        self._wake = threading.Event()  # deferred work, or closing
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name=f"aiocoloc-pool-{pool_id.hex[:8]}", daemon=True
        )
        self._heartbeat.start()

    # -- creating and attaching -------------------------------------------------

    @classmethod
    def create(
        cls, segment: Segment, config: PoolConfig | None = None, *, close_segment: bool = True
    ) -> Pool:
        """Format ``segment`` as a new pool and join it."""
        config = config or PoolConfig()
        geometry = PoolGeometry.plan(segment.size, config)
        region = segment.map()
        words = SharedWords(region)
        try:
            if not words.cas32(_H_STATE, _STATE_BLANK, _STATE_FORMATTING):
                raise PoolError(f"{segment.identity} is already a pool (or being formatted)")
            words.store32(_H_FORMATTER_PID, os.getpid())
            pool_id = uuid.uuid4()
            _format(region, words, geometry, pool_id, config.lease)
        except BaseException:
            words.release()
            region.close()
            raise
        words.release()
        _log.info(
            "created pool %s on %s: %d slices of %d bytes",
            pool_id,
            segment.identity,
            geometry.slice_count,
            geometry.slice_size,
        )
        return cls._joined(segment, region, geometry, pool_id, config.lease, close_segment)

    @classmethod
    def attach(cls, segment: Segment, *, timeout: float = 5.0, close_segment: bool = True) -> Pool:
        """Join the pool on ``segment``, waiting up to ``timeout`` for its creator."""
        region = segment.map()
        try:
            geometry, pool_id, lease = _validate(region, segment, timeout)
        except BaseException:
            region.close()
            raise
        return cls._joined(segment, region, geometry, pool_id, lease, close_segment)

    @classmethod
    def _joined(
        cls,
        segment: Segment,
        region: Any,
        geometry: PoolGeometry,
        pool_id: uuid.UUID,
        lease: float,
        close_segment: bool,
    ) -> Pool:
        """A member of the pool on ``region``, which is unmapped if joining
        fails (``PoolBusy`` on an event loop while another member holds the
        allocator lock, ``PoolExhausted`` without a free member slot)."""
        try:
            return cls(segment, region, geometry, pool_id, lease, close_segment=close_segment)
        except BaseException:
            region.close()
            raise

    @classmethod
    def open_posix(
        cls,
        name: str,
        size: int,
        config: PoolConfig | None = None,
        *,
        group: str | int | None = None,
        timeout: float = 5.0,
    ) -> Pool:
        """Create the named POSIX pool, or attach to it if it exists.

        Race-free: of many processes starting at once exactly one creates and
        formats it, the others wait for it to be ready.  The name stays in
        ``/dev/shm`` until an operator (or ``unlink()``) removes it.
        """
        if not atomics_are_process_safe():
            raise PoolError("sharing a pool between processes needs the compiled extension")
        try:
            segment: Segment = PosixShmSegment.create(
                name, size, group=group, unlink=UnlinkPolicy.NEVER
            )
        except SegmentError:
            segment = PosixShmSegment.attach(name, min_size=HEADER_SIZE)
            try:
                return cls.attach(segment, timeout=timeout)
            except PoolError:
                if not _abandoned_by_formatter(segment):
                    segment.close()
                    raise
                _log.warning(
                    "pool %s: its creator died while formatting it; formatting it again", name
                )
            except BaseException:
                segment.close()
                raise
        try:
            return cls.create(segment, config)
        except BaseException:
            segment.close()
            raise

    # -- membership -----------------------------------------------------------

    def _member_offset(self, slot: int) -> int:
        if not 0 <= slot < self.geometry.max_members:
            raise PoolCorrupted(f"member slot {slot} out of range")
        return self.geometry.member_offset + slot * MEMBER_ENTRY_SIZE

    def _join(self) -> tuple[int, int]:
        with self._locked_for_join():
            for slot in range(self.geometry.max_members):
                off = self._member_offset(slot)
                if self._words.load32(off + _M_STATE) == _FREE:
                    generation = (self._words.load32(off + _M_GENERATION) + 1) & 0xFFFFFFFF or 1
                    self._region[off + _M_ENDPOINT : off + _M_ENDPOINT + 16] = (
                        self.endpoint_id.bytes
                    )
                    self._words.store32(off + _M_PID, os.getpid())
                    self._words.store64(off + _M_HEARTBEAT, 1)
                    self._words.store32(off + _M_GENERATION, generation)
                    self._words.store32(off + _M_STATE, _ACTIVE)
                    _log.debug("joined pool %s as member %d", self.id, slot)
                    return slot, generation
        raise PoolExhausted(
            f"pool {self.id} has no free member slot ({self.geometry.max_members} in use)"
        )

    @contextlib.contextmanager
    def _locked_for_join(self) -> Iterator[None]:
        # Before we have a slot we lock as a pseudo-member (judged by time
        # alone: we hold the lock for microseconds), with a random token so
        # that joiners racing each other never mistake the lock for their own.
        self.slot, self.generation = self.geometry.max_members, secrets.randbits(31) | 1
        with self.locked():
            yield

    def members(self) -> list[dict[str, Any]]:
        """Active members: slot, generation, endpoint id, pid, heartbeat."""
        out = []
        for slot in range(self.geometry.max_members):
            off = self._member_offset(slot)
            if self._words.load32(off + _M_STATE) == _ACTIVE:
                out.append(
                    {
                        "slot": slot,
                        "generation": self._words.load32(off + _M_GENERATION),
                        "endpoint": uuid.UUID(bytes=bytes(self._region[off + 16 : off + 32])),
                        "pid": self._words.load32(off + _M_PID),
                        "heartbeat": self._words.load64(off + _M_HEARTBEAT),
                    }
                )
        return out

    def beat(self) -> None:
        """Advance this member's heartbeat (the daemon thread does it)."""
        self._words.add64(self._member_offset(self.slot) + _M_HEARTBEAT, 1)

    def _heartbeat_loop(self) -> None:
        """Beat and reap every quarter lease; free deferred pipes as soon as
        the lock allows.  Every lock attempt here is short, so a busy lock
        never delays a beat (or a close waiting for this thread)."""
        period = self.lease / 4
        next_beat = time.monotonic() + period
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + period
                    self.beat()
                    self.reap(lock_timeout=BACKGROUND_LOCK_WAIT)
                if self._deferred:
                    with self.locked(BACKGROUND_LOCK_WAIT):
                        self._destroy_deferred_locked()
            except PoolBusy:
                pass  # another member holds the lock: next time
            except Exception:  # the pool may be closing under us
                if not self._stop.is_set():
                    _log.exception("pool %s heartbeat failed", self.id)
            wait = next_beat - time.monotonic()
            if self._deferred:
                wait = min(wait, DEFERRED_RETRY)
            self._wake.wait(max(wait, 0.0))
            self._wake.clear()

    def _stale(self, slot: int, now: float) -> bool:
        """True if member ``slot`` has not beaten for a lease by our clock."""
        off = self._member_offset(slot)
        generation = self._words.load32(off + _M_GENERATION)
        counter = self._words.load64(off + _M_HEARTBEAT)
        seen = self._observed.get(slot)
        if seen is None or seen.generation != generation or seen.counter != counter:
            self._observed[slot] = _Observed(generation, counter, now)
            return False
        return now - seen.since >= self.lease

    def reap(self, lock_timeout: float | None = None) -> list[int]:
        """Reclaim members whose heartbeat stalled for a lease; returns their
        slots.  ``lock_timeout``: as ``locked()``'s."""
        now = time.monotonic()
        dead = []
        for slot in range(self.geometry.max_members):
            if slot == self.slot:
                continue
            off = self._member_offset(slot)
            if self._words.load32(off + _M_STATE) == _ACTIVE and self._stale(slot, now):
                dead.append(slot)
        if not dead:
            return []
        reclaimed = []
        with self.locked(lock_timeout):
            for slot in dead:
                off = self._member_offset(slot)
                if self._words.load32(off + _M_STATE) == _ACTIVE and self._stale(slot, now):
                    freed = self._remove_member(slot)
                    reclaimed.append(slot)
                    _log.info(
                        "pool %s: member %d (pid %d) stopped heartbeating; reclaimed "
                        "%d pipes and %d slices",
                        self.id,
                        slot,
                        self._words.load32(off + _M_PID),
                        freed[0],
                        freed[1],
                    )
        return reclaimed

    def _remove_member(self, slot: int) -> tuple[int, int]:
        """Under the lock: end the member's pipes and free its slot.

        A pipe whose other end is still attached is only closed (both closed
        flags set, so that end sees EOF or ``RingClosed``): its slices stay
        owned until that end destroys it, so a write racing with the close
        can never land in a slice another pipe already reuses.
        """
        pipes = slices = 0
        self._words.store32(self._member_offset(slot) + _M_STATE, _FREE)
        self._observed.pop(slot, None)
        for p in range(self.geometry.max_pipes):
            off = self._pipe_offset(p)
            if self._words.load32(off + _P_STATE) not in (_ACTIVE, _CLOSING):
                continue
            ends = (self._words.load32(off + _P_PRODUCER), self._words.load32(off + _P_CONSUMER))
            if slot not in ends:
                continue
            pipes += 1
            if any(self._member_active(m) for m in ends if m != slot):
                self._close_pipe_locked(p)
            else:
                slices += self._destroy_pipe_locked(p)
        return pipes, slices

    def _member_active(self, slot: int) -> bool:
        if not 0 <= slot < self.geometry.max_members:
            return False
        return self._words.load32(self._member_offset(slot) + _M_STATE) == _ACTIVE

    def _close_pipe_locked(self, slot: int) -> None:
        off = self._pipe_offset(slot)
        self._words.store32(off + _PIPE_PRODUCER_CLOSED, 1)
        self._words.store32(off + _PIPE_CONSUMER_CLOSED, 1)
        self._words.store32(off + _P_STATE, _CLOSING)

    # -- the allocator lock ---------------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the pool's allocator lock (across processes and threads).

        Waits up to ``timeout`` seconds, by default three leases, or on an
        event loop's thread well under a millisecond (``aiocoloc.pool_lock``:
        a loop never waits on another member), then raises ``PoolBusy``.
        """
        if self._closed or self._leaving:
            raise PoolError(f"pool {self.id} is closed")
        self._hold(timeout)
        try:
            yield
        finally:
            self._unhold()

    def _lock_value(self) -> int:
        return ((self.slot + 1) << 32) | self.generation

    def _hold(self, timeout: float | None) -> None:
        self._allocator.hold(self._lock_value(), timeout)

    def _unhold(self) -> None:
        self._allocator.release(self._lock_value())

    def _holder_gone(self, held: int, acquisition: tuple[int, int], now: float) -> bool:
        """Whether the member holding the lock (value ``held``) is gone."""
        slot, generation = (held >> 32) - 1, held & 0xFFFFFFFF
        if slot == self.geometry.max_members:
            return False  # a joiner, not a member yet: judged by the time alone
        if not 0 <= slot < self.geometry.max_members:
            return True  # garbage in the lock word
        off = self._member_offset(slot)
        if (
            self._words.load32(off + _M_STATE) != _ACTIVE
            or self._words.load32(off + _M_GENERATION) != generation
        ):
            # A member leaving the pool gives up its slot under the lock and
            # releases the lock microseconds later: only a holder that stays
            # gone for a while is dead.
            if self._gone_seen is None or self._gone_seen[0] != acquisition:
                self._gone_seen = (acquisition, now)
            return now - self._gone_seen[1] >= HOLDER_GONE_GRACE
        return self._stale(slot, now)

    def _repair(self) -> None:
        """Under the lock, after a take-over: free slices whose pipe is not active."""
        for index, owner in enumerate(self._slice_table()):
            if owner == 0:
                continue
            p = owner - 1
            if p >= self.geometry.max_pipes or self._words.load32(
                self._pipe_offset(p) + _P_STATE
            ) not in (_ACTIVE, _CLOSING):
                self._words.store32(self._slice_entry(index), 0)

    # -- pipes ----------------------------------------------------------------

    def _pipe_offset(self, slot: int) -> int:
        if not 0 <= slot < self.geometry.max_pipes:
            raise PoolCorrupted(f"pipe slot {slot} out of range")
        return self.geometry.pipe_offset + slot * self.geometry.pipe_entry_size

    def _slice_entry(self, index: int) -> int:
        return self.geometry.slice_table_offset + 4 * index

    def _check_handle(self, handle: PipeHandle, *, closing_ok: bool = False) -> int:
        if self._closed:
            raise PoolError(f"pool {self.id} is closed")
        off = self._pipe_offset(handle.slot)
        state = self._words.load32(off + _P_STATE)
        if (
            state not in ((_ACTIVE, _CLOSING) if closing_ok else (_ACTIVE,))
            or self._words.load32(off + _P_GENERATION) != handle.generation
        ):
            raise PoolError(f"pipe {handle} no longer exists in pool {self.id}")
        return off

    def _slice_table(self) -> list[int]:
        """A snapshot of every slice's owner entry (0: free), read in bulk.
        Exact under the lock, where every owner change happens."""
        g = self.geometry
        start = g.slice_table_offset
        with memoryview(self._region) as region, region[start : start + 4 * g.slice_count] as raw:
            with raw.cast("I") as table:
                return table.tolist()

    def free_slice_count(self) -> int:
        """Slices no pipe owns right now (a snapshot: others may be allocating)."""
        return self._slice_table().count(0)

    def _free_slices(self, count: int) -> list[int]:
        return _positions(self._slice_table(), 0, count)

    def create_pipe(
        self,
        producer: int,
        consumer: int,
        *,
        min_slices: int = 1,
        max_slices: int | None = None,
        initial: int | None = None,
    ) -> PipeHandle:
        """A new pipe from member ``producer`` to member ``consumer``.

        It starts with ``initial`` slices (default ``min_slices``) and the
        policy keeps it within ``[min_slices, max_slices]``.
        """
        g = self.geometry
        most = g.max_slices_per_pipe if max_slices is None else max_slices
        first = min_slices if initial is None else initial
        if not 1 <= min_slices <= first <= most <= g.max_slices_per_pipe:
            raise ValueError(
                f"need 1 <= min_slices <= initial <= max_slices <= "
                f"{g.max_slices_per_pipe}, got {min_slices}, {first}, {most}"
            )
        for member in (producer, consumer):
            if not 0 <= member < g.max_members:
                raise ValueError(f"member slot {member} out of range")
        with self.locked():
            for member in (producer, consumer):
                if not self._member_active(member):
                    raise PoolError(f"member {member} is not attached to pool {self.id}")
            slot = next(
                (
                    p
                    for p in range(g.max_pipes)
                    if self._words.load32(self._pipe_offset(p) + _P_STATE) == _FREE
                ),
                None,
            )
            if slot is None:
                raise PoolExhausted(f"pool {self.id} has no free pipe entry ({g.max_pipes} in use)")
            slices = self._free_slices(first)
            if len(slices) < first:
                raise PoolExhausted(
                    f"pool {self.id} has {len(slices)} free slices, a new pipe needs {first}"
                )
            off = self._pipe_offset(slot)
            generation = (self._words.load32(off + _P_GENERATION) + 1) & 0xFFFFFFFF or 1
            for index in slices:
                self._words.store32(self._slice_entry(index), slot + 1)
            ring.format_pipe(self._region, off, g.max_slices_per_pipe, slices)
            for field, value in (
                (_P_PRODUCER, producer),
                (_P_CONSUMER, consumer),
                (_P_MIN, min_slices),
                (_P_MAX, most),
                (_P_TARGET, first),
            ):
                self._words.store32(off + field, value)
            self._words.store64(off + _P_OFFERED, 0)
            self._words.store64(off + _P_BLOCKED_NS, 0)
            self._words.store32(off + _P_GENERATION, generation)
            self._words.store32(off + _P_STATE, _ACTIVE)
        return PipeHandle(slot, generation)

    def _destroy_pipe_locked(self, slot: int) -> int:
        self._close_pipe_locked(slot)
        owned = _positions(self._slice_table(), slot + 1)
        for index in owned:
            self._words.store32(self._slice_entry(index), 0)
        self._words.store32(self._pipe_offset(slot) + _P_STATE, _FREE)
        return len(owned)

    def destroy_pipe(self, handle: PipeHandle) -> int:
        """Free the pipe and all its slices; returns how many slices were freed.

        On an event loop's thread, when another member holds the allocator
        lock, the pool's own thread frees the pipe as soon as it can (0 is
        returned): closing a connection never waits for another member.
        """
        try:
            with self.locked():
                self._check_handle(handle, closing_ok=True)
                return self._destroy_pipe_locked(handle.slot)
        except PoolBusy:
            if not on_event_loop():
                raise
        self._check_handle(handle, closing_ok=True)  # gone already: say so now
        self._deferred.append(handle)
        self._wake.set()
        return 0

    def _destroy_deferred_locked(self) -> None:
        while self._deferred:
            handle = self._deferred.pop()
            try:
                self._check_handle(handle, closing_ok=True)
            except PoolError:
                continue  # the other end (or a reaper) freed it meanwhile
            self._destroy_pipe_locked(handle.slot)

    def allocate_slices(self, handle: PipeHandle, count: int) -> list[int]:
        """Give the pipe up to ``count`` more free slices (fewer if the pool or
        the pipe's maximum runs out); returns their indices."""
        if count <= 0:
            return []
        with self.locked():
            off = self._check_handle(handle)
            table = self._slice_table()
            room = self._words.load32(off + _P_MAX) - table.count(handle.slot + 1)
            slices = _positions(table, 0, min(count, max(room, 0)))
            for index in slices:
                self._words.store32(self._slice_entry(index), handle.slot + 1)
            return slices

    def release_slices(self, handle: PipeHandle, indices: list[int]) -> None:
        """Hand slices back that the pipe's layout no longer uses."""
        with self.locked():
            self._check_handle(handle)
            for index in indices:
                if not 0 <= index < self.geometry.slice_count:
                    raise ValueError(f"slice {index} is not in the pool")
                if self._words.load32(self._slice_entry(index)) != handle.slot + 1:
                    raise PoolError(f"slice {index} is not owned by pipe {handle}")
                self._words.store32(self._slice_entry(index), 0)

    def slice_owners(self) -> list[int]:
        """For each slice, the owning pipe slot, or -1 when free."""
        return [owner - 1 for owner in self._slice_table()]

    def pipes(self) -> list[PipeInfo]:
        """Snapshots of every active pipe: one pass over each table."""
        if self._closed:
            raise PoolError(f"pool {self.id} is closed")
        owned = Counter(self._slice_table())  # owner entry (pipe slot + 1) -> slices
        load32, load64 = self._words.load32, self._words.load64
        g = self.geometry
        out = []
        for slot in range(g.max_pipes):
            off = g.pipe_offset + slot * g.pipe_entry_size
            if load32(off + _P_STATE) not in (_ACTIVE, _CLOSING):
                continue
            out.append(
                PipeInfo(
                    handle=PipeHandle(slot, load32(off + _P_GENERATION)),
                    producer=load32(off + _P_PRODUCER),
                    consumer=load32(off + _P_CONSUMER),
                    min_slices=load32(off + _P_MIN),
                    max_slices=load32(off + _P_MAX),
                    target_slices=load32(off + _P_TARGET),
                    owned_slices=owned[slot + 1],
                    offered_bytes=load64(off + _P_OFFERED),
                    blocked_ns=load64(off + _P_BLOCKED_NS),
                )
            )
        return out

    def publish_demand(
        self, handle: PipeHandle, offered_bytes: int, blocked_ns: int, target: int | None = None
    ) -> None:
        """The producer's demand counters (and the policy's target) for all to see."""
        off = self._check_handle(handle)
        self._words.store64(off + _P_OFFERED, offered_bytes)
        self._words.store64(off + _P_BLOCKED_NS, blocked_ns)
        if target is not None:
            self._words.store32(off + _P_TARGET, target)

    def _end_args(self, handle: PipeHandle, role: int) -> tuple[int, ...]:
        off = self._check_handle(handle)
        member = self._words.load32(off + role)
        if member != self.slot:
            name = "producer" if role == _P_PRODUCER else "consumer"
            raise PoolError(f"pipe {handle}'s {name} is member {member}, we are {self.slot}")
        g = self.geometry
        return (off, g.data_offset, g.slice_size, g.slice_count, g.max_slices_per_pipe)

    def pipe_producer(self, handle: PipeHandle) -> Any:
        """The writing end of a pipe whose producer is this member."""
        end = ring.PipeProducer(self._region, *self._end_args(handle, _P_PRODUCER))
        self._ends.add(end)
        return end

    def pipe_consumer(self, handle: PipeHandle) -> Any:
        """The reading end of a pipe whose consumer is this member."""
        end = ring.PipeConsumer(self._region, *self._end_args(handle, _P_CONSUMER))
        self._ends.add(end)
        return end

    # -- accounting and closing -------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counts for leak checks and the CLI."""
        owners = self.slice_owners()
        return {
            "members": len(self.members()),
            "pipes": len(self.pipes()),
            "slices": len(owners),
            "slices_used": sum(1 for o in owners if o >= 0),
            "open_ends": sum(1 for end in self._ends if not end.released),
        }

    @property
    def closed(self) -> bool:
        return self._closed or self._leaving

    def close(self) -> None:
        """Leave the pool: destroy our pipes, free our slot, unmap.  Idempotent.

        On an event loop's thread, when another member holds the allocator
        lock, a thread of ours finishes leaving once it gets the lock.
        """
        if self._closed or self._leaving:
            return
        self._leaving = True
        self._stop.set()
        self._wake.set()
        self._heartbeat.join()  # its lock attempts are short
        for end in list(self._ends):
            end.release()
        try:
            self._hold(None)
        except PoolBusy as exc:
            if on_event_loop():
                threading.Thread(
                    target=self._leave, name=f"aiocoloc-pool-leave-{self.id.hex[:8]}", daemon=True
                ).start()
            else:
                _log.warning("pool %s: could not leave cleanly: %s", self.id, exc)
                self._unmap()
            return
        self._leave_locked()

    def _leave(self) -> None:
        try:
            self._hold(self.lease * 3)
        except PoolError as exc:
            _log.warning("pool %s: could not leave cleanly: %s", self.id, exc)
            self._unmap()
        else:
            self._leave_locked()

    def _leave_locked(self) -> None:
        """Holding the lock: free deferred pipes, leave, unlock, unmap."""
        try:
            self._destroy_deferred_locked()
            self._remove_member(self.slot)
        except PoolError as exc:
            _log.warning("pool %s: could not leave cleanly: %s", self.id, exc)
        finally:
            self._unhold()
        self._unmap()

    def _unmap(self) -> None:
        self._closed = True
        self._words.release()
        try:
            self._region.close()
        except BufferError:
            _log.warning(
                "pool %s: views into the pool (from peek()) are still held; the "
                "mapping stays until they are released",
                self.id,
            )
        if self._close_segment:
            self.segment.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Pool {self.id} on {self.segment.identity} member={self.slot} "
            f"slices={self.geometry.slice_count}x{self.geometry.slice_size}>"
        )


def _abandoned_by_formatter(segment: Segment) -> bool:
    """True (and the pool reset to blank) if the process formatting it is dead.

    Only meaningful for pools of this kernel: the formatter's pid is checked
    with ``kill(pid, 0)``.
    """
    region = segment.map()
    words = SharedWords(region)
    try:
        if words.load32(_H_STATE) != _STATE_FORMATTING:
            return False
        try:
            os.kill(words.load32(_H_FORMATTER_PID), 0)
        except ProcessLookupError:
            return bool(words.cas32(_H_STATE, _STATE_FORMATTING, _STATE_BLANK))
        except PermissionError:
            pass  # alive, someone else's
        return False
    finally:
        words.release()
        region.close()


def _format(
    region: Any, words: SharedWords, g: PoolGeometry, pool_id: uuid.UUID, lease: float
) -> None:
    """Write a fresh pool header and empty tables; state goes to ready last."""
    region[16 : g.data_offset] = bytes(g.data_offset - 16)
    region[_H_UUID : _H_UUID + 16] = pool_id.bytes
    words.store64(_H_SIZE, g.size)
    for field, value in (
        (_H_SLICE_SIZE, g.slice_size),
        (_H_SLICE_COUNT, g.slice_count),
        (_H_MAX_MEMBERS, g.max_members),
        (_H_MAX_PIPES, g.max_pipes),
        (_H_MAX_SLICES_PER_PIPE, g.max_slices_per_pipe),
        (_H_PIPE_ENTRY_SIZE, g.pipe_entry_size),
    ):
        words.store32(field, value)
    for field, value in (
        (_H_MEMBER_OFFSET, g.member_offset),
        (_H_PIPE_OFFSET, g.pipe_offset),
        (_H_SLICE_TABLE_OFFSET, g.slice_table_offset),
        (_H_DATA_OFFSET, g.data_offset),
        (_H_LEASE_MS, int(lease * 1000)),
    ):
        words.store64(field, value)
    region[_H_MAGIC : _H_MAGIC + 8] = POOL_MAGIC
    words.store32(_H_VERSION, POOL_VERSION)
    words.store32(_H_STATE, _STATE_READY)


def _validate(
    region: Any, segment: Segment, timeout: float
) -> tuple[PoolGeometry, uuid.UUID, float]:
    """Wait for the pool on ``region`` to be ready and check its geometry."""
    words = SharedWords(region)
    try:
        deadline = time.monotonic() + timeout
        while words.load32(_H_STATE) != _STATE_READY:
            if time.monotonic() > deadline:
                state = words.load32(_H_STATE)
                what = (
                    "blank (nobody formatted it)"
                    if state == _STATE_BLANK
                    else f"still being formatted by pid {words.load32(_H_FORMATTER_PID)}"
                    if state == _STATE_FORMATTING
                    else f"in unknown state {state}"
                )
                raise PoolError(f"{segment.identity} is not a ready pool after {timeout} s: {what}")
            time.sleep(0.005)
        magic = bytes(region[_H_MAGIC : _H_MAGIC + 8])
        if magic != POOL_MAGIC:
            raise PoolError(f"{segment.identity} is not a pool: magic {magic!r}")
        version = words.load32(_H_VERSION)
        if version != POOL_VERSION:
            raise PoolError(
                f"{segment.identity}: pool layout version {version} is not "
                f"supported (this aiocoloc speaks {POOL_VERSION})"
            )
        size = words.load64(_H_SIZE)
        if size > len(region):
            raise PoolError(
                f"{segment.identity}: pool says {size} bytes, segment has {len(region)}"
            )
        lease = words.load64(_H_LEASE_MS) / 1000
        config = PoolConfig(
            slice_size=words.load32(_H_SLICE_SIZE),
            max_members=words.load32(_H_MAX_MEMBERS),
            max_pipes=words.load32(_H_MAX_PIPES),
            max_slices_per_pipe=words.load32(_H_MAX_SLICES_PER_PIPE),
            lease=lease,
        )
        # Recompute the layout from the knobs and insist the header agrees:
        # every offset we use then comes from our own arithmetic.
        try:
            expected = PoolGeometry.plan(size, config)
        except PoolError as exc:
            raise PoolError(f"{segment.identity}: pool header is inconsistent: {exc}") from None
        found = (
            words.load32(_H_SLICE_COUNT),
            words.load32(_H_PIPE_ENTRY_SIZE),
            words.load64(_H_MEMBER_OFFSET),
            words.load64(_H_PIPE_OFFSET),
            words.load64(_H_SLICE_TABLE_OFFSET),
            words.load64(_H_DATA_OFFSET),
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
        return expected, uuid.UUID(bytes=bytes(region[_H_UUID : _H_UUID + 16])), lease
    finally:
        words.release()
