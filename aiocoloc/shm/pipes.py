"""A pool's pipe table and slice table: pipes, the slices they own, their demand.

Every change to either table is made under the allocator lock: methods named
``*_locked`` expect the caller (the ``Pool``) to hold it.  Reads outside the
lock are snapshots (others may be allocating).  The layout of both tables is
``aiocoloc.shm.layout``'s; a pipe's channel cells and slice layouts are the
ring's (``_ring.pxd``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

from aiocoloc import ring
from aiocoloc.errors import PoolCorrupted, PoolError, PoolExhausted
from aiocoloc.shm.atomic import SharedWords
from aiocoloc.shm.layout import (
    ACTIVE,
    CLOSING,
    FREE,
    P_BLOCKED_NS,
    P_CONSUMER,
    P_GENERATION,
    P_MAX,
    P_MIN,
    P_OFFERED,
    P_PRODUCER,
    P_STATE,
    P_TARGET,
    PIPE_CONSUMER_CLOSED,
    PIPE_PRODUCER_CLOSED,
    PoolGeometry,
)

__all__ = ["PipeHandle", "PipeInfo", "PipeTable"]

#: Up to this many pipes in use, their slices are counted one pipe at a time
#: in C (a few microseconds each); past it, one pass over the slice table in
#: Python costs less.
_COUNT_EACH_MAX = 16


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


class PipeTable:
    """The pipe and slice tables of one pool, as this process sees them."""

    def __init__(self, region: Any, words: SharedWords, geometry: PoolGeometry, name: str) -> None:
        self._region = region
        self._words = words
        self.geometry = geometry
        self._name = name
        self._detached = False
        # Pipes an event loop could not free at once (the lock was busy):
        # the pool's thread frees them.
        self._deferred: list[PipeHandle] = []

    def detach(self) -> None:
        """The mapping is going away: from now on every use says the pool is closed."""
        self._detached = True

    # -- entries ----------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        if not 0 <= slot < self.geometry.max_pipes:
            raise PoolCorrupted(f"pipe slot {slot} out of range")
        return self.geometry.pipe_offset + slot * self.geometry.pipe_entry_size

    def _slice_entry(self, index: int) -> int:
        return self.geometry.slice_table_offset + 4 * index

    def _check(self, handle: PipeHandle, *, closing_ok: bool = False) -> int:
        """The offset of ``handle``'s entry; raises ``PoolError`` if that pipe is gone."""
        if self._detached:
            raise PoolError(f"pool {self._name} is closed")
        off = self._offset(handle.slot)
        state = self._words.load32(off + P_STATE)
        if (
            state not in ((ACTIVE, CLOSING) if closing_ok else (ACTIVE,))
            or self._words.load32(off + P_GENERATION) != handle.generation
        ):
            raise PoolError(f"pipe {handle} no longer exists in pool {self._name}")
        return off

    def is_active(self, handle: PipeHandle) -> bool:
        """Whether ``handle``'s pipe is active (``_check`` passes)."""
        try:
            self._check(handle)
        except PoolError:
            return False
        return True

    def _slice_table(self) -> list[int]:
        """A snapshot of every slice's owner entry (0: free), read in bulk.
        Exact under the lock, where every owner change happens."""
        g = self.geometry
        start = g.slice_table_offset
        with memoryview(self._region) as region, region[start : start + 4 * g.slice_count] as raw:
            with raw.cast("I") as table:
                return table.tolist()

    def _slices_owned_by(self, owner: int, limit: int = -1) -> list[int]:
        """Indices of the slices whose entry is ``owner`` (0: free), the first
        ``limit`` of them or all, searched in C (``SharedWords.find32``): a
        pool's slice table has thousands, and every new or freed pipe searches it."""
        g = self.geometry
        return self._words.find32(g.slice_table_offset, g.slice_count, 4, owner, limit)

    def _free_entries(self, limit: int) -> list[int]:
        """The first ``limit`` free pipe entries, searched in C."""
        g = self.geometry
        return self._words.find32(
            g.pipe_offset + P_STATE, g.max_pipes, g.pipe_entry_size, FREE, limit
        )

    # -- creating and destroying (under the lock) ---------------------------------

    def bounds(
        self,
        producer: int,
        consumer: int,
        min_slices: int,
        max_slices: int | None,
        initial: int | None,
    ) -> tuple[int, int]:
        """Check a new pipe's arguments; returns its (max, initial) slices."""
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
        return most, first

    def create_locked(
        self, producer: int, consumer: int, min_slices: int, most: int, first: int
    ) -> PipeHandle:
        """A new pipe with ``first`` slices (arguments checked by ``bounds``)."""
        g = self.geometry
        load32, store32 = self._words.load32, self._words.store32
        free = self._free_entries(1)
        if not free:
            raise PoolExhausted(f"pool {self._name} has no free pipe entry ({g.max_pipes} in use)")
        slot = free[0]
        slices = self._slices_owned_by(0, first)
        if len(slices) < first:
            raise PoolExhausted(
                f"pool {self._name} has {len(slices)} free slices, a new pipe needs {first}"
            )
        off = self._offset(slot)
        generation = (load32(off + P_GENERATION) + 1) & 0xFFFFFFFF or 1
        for index in slices:
            store32(self._slice_entry(index), slot + 1)
        ring.format_pipe(self._region, off, g.max_slices_per_pipe, slices)
        for field, value in (
            (P_PRODUCER, producer),
            (P_CONSUMER, consumer),
            (P_MIN, min_slices),
            (P_MAX, most),
            (P_TARGET, first),
        ):
            store32(off + field, value)
        self._words.store64(off + P_OFFERED, 0)
        self._words.store64(off + P_BLOCKED_NS, 0)
        # The entry becomes visible last, once it is whole.
        store32(off + P_GENERATION, generation)
        store32(off + P_STATE, ACTIVE)
        return PipeHandle(slot, generation)

    def _close_slot_locked(self, slot: int) -> None:
        off = self._offset(slot)
        self._words.store32(off + PIPE_PRODUCER_CLOSED, 1)
        self._words.store32(off + PIPE_CONSUMER_CLOSED, 1)
        self._words.store32(off + P_STATE, CLOSING)

    def _destroy_slot_locked(self, slot: int) -> int:
        self._close_slot_locked(slot)
        owned = self._slices_owned_by(slot + 1)
        for index in owned:
            self._words.store32(self._slice_entry(index), 0)
        self._words.store32(self._offset(slot) + P_STATE, FREE)
        return len(owned)

    def destroy_locked(self, handle: PipeHandle) -> int:
        """Free the pipe (active or closing) and its slices; returns how many were freed."""
        self._check(handle, closing_ok=True)
        return self._destroy_slot_locked(handle.slot)

    def end_pipes_of_locked(self, member: int, active: Callable[[int], bool]) -> tuple[int, int]:
        """End every pipe of ``member``, which is leaving or dead; returns how
        many pipes and slices that touched.

        A pipe whose other end is still attached (``active``) is only closed
        (both closed flags set, so that end sees EOF or ``RingClosed``): its
        slices stay owned until that end destroys it, so a write racing with
        the close can never land in a slice another pipe already reuses.
        """
        pipes = slices = 0
        load32 = self._words.load32
        for p in self._slots_in_use():  # (a loop over every entry held the lock ~2 ms)
            off = self._offset(p)
            if load32(off + P_STATE) not in (ACTIVE, CLOSING):
                continue
            ends = (load32(off + P_PRODUCER), load32(off + P_CONSUMER))
            if member not in ends:
                continue
            pipes += 1
            if any(active(m) for m in ends if m != member):
                self._close_slot_locked(p)
            else:
                slices += self._destroy_slot_locked(p)
        return pipes, slices

    def repair_locked(self) -> None:
        """After a take-over of the lock: free slices whose pipe is not active."""
        for index, owner in enumerate(self._slice_table()):
            if owner == 0:
                continue
            p = owner - 1
            if p >= self.geometry.max_pipes or self._words.load32(
                self._offset(p) + P_STATE
            ) not in (ACTIVE, CLOSING):
                self._words.store32(self._slice_entry(index), 0)

    # -- frees deferred to the pool's thread --------------------------------------

    def defer(self, handle: PipeHandle) -> None:
        """Free the pipe later (``destroy_deferred_locked``); raises now if it is gone."""
        self._check(handle, closing_ok=True)
        self._deferred.append(handle)

    def has_deferred(self) -> bool:
        """Whether pipes wait to be freed."""
        return bool(self._deferred)

    def destroy_deferred_locked(self) -> None:
        """Free the pipes that ``defer`` set aside."""
        while self._deferred:
            handle = self._deferred.pop()
            try:
                self._check(handle, closing_ok=True)
            except PoolError:
                continue  # the other end (or a reaper) freed it meanwhile
            self._destroy_slot_locked(handle.slot)

    # -- slices -------------------------------------------------------------------

    def allocate_locked(self, handle: PipeHandle, count: int) -> list[int]:
        """Give the pipe up to ``count`` more free slices (fewer if the pool or
        the pipe's maximum runs out); returns their indices."""
        off = self._check(handle)
        g = self.geometry
        owned = self._words.count32(g.slice_table_offset, g.slice_count, 4, handle.slot + 1)
        room = self._words.load32(off + P_MAX) - owned
        slices = self._slices_owned_by(0, min(count, max(room, 0)))
        for index in slices:
            self._words.store32(self._slice_entry(index), handle.slot + 1)
        return slices

    def release_locked(self, handle: PipeHandle, indices: list[int]) -> None:
        """Hand slices back that the pipe's layout no longer uses."""
        self._check(handle)
        for index in indices:
            if not 0 <= index < self.geometry.slice_count:
                raise ValueError(f"slice {index} is not in the pool")
            if self._words.load32(self._slice_entry(index)) != handle.slot + 1:
                raise PoolError(f"slice {index} is not owned by pipe {handle}")
            self._words.store32(self._slice_entry(index), 0)

    def slice_owners(self) -> list[int]:
        """For each slice, the owning pipe slot, or -1 when free."""
        return [owner - 1 for owner in self._slice_table()]

    def free_slice_count(self) -> int:
        """Slices no pipe owns right now (a snapshot: others may be allocating)."""
        g = self.geometry
        return self._words.count32(g.slice_table_offset, g.slice_count, 4, 0)

    def has_free_entries(self, count: int) -> bool:
        """Whether ``count`` pipe entries are free now (a snapshot; the scan
        stops at the ``count``-th free one)."""
        return count <= 0 or len(self._free_entries(count)) >= count

    # -- reading and publishing -----------------------------------------------------

    def infos(self) -> list[PipeInfo]:
        """Snapshots of every active pipe.  The pipe entries in use are found
        in C (``find32``): a serving pool has 2048 entries and a few in use,
        and every resize tick of every busy connection asks (a loop over all
        of them in Python took ~0.5 ms, a hiccup in each process every tick)."""
        if self._detached:
            raise PoolError(f"pool {self._name} is closed")
        load32, load64 = self._words.load32, self._words.load64
        g = self.geometry
        slots = self._slots_in_use()
        owned = self._owned_slices(slots)
        out = []
        for slot in slots:
            off = g.pipe_offset + slot * g.pipe_entry_size
            if load32(off + P_STATE) not in (ACTIVE, CLOSING):
                continue  # freed since
            out.append(
                PipeInfo(
                    handle=PipeHandle(slot, load32(off + P_GENERATION)),
                    producer=load32(off + P_PRODUCER),
                    consumer=load32(off + P_CONSUMER),
                    min_slices=load32(off + P_MIN),
                    max_slices=load32(off + P_MAX),
                    target_slices=load32(off + P_TARGET),
                    owned_slices=owned[slot + 1],
                    offered_bytes=load64(off + P_OFFERED),
                    blocked_ns=load64(off + P_BLOCKED_NS),
                )
            )
        return out

    def _slots_in_use(self) -> list[int]:
        """The pipe entries active or closing, in order, found in C."""
        g = self.geometry
        states = (g.pipe_offset + P_STATE, g.max_pipes, g.pipe_entry_size)
        return sorted(
            self._words.find32(*states, ACTIVE, -1) + self._words.find32(*states, CLOSING, -1)
        )

    def _owned_slices(self, slots: list[int]) -> Counter[int]:
        """Slices per owner entry (pipe slot + 1) for ``slots``: one count in C
        per pipe when they are few, else one pass over the slice table."""
        g = self.geometry
        if len(slots) > _COUNT_EACH_MAX:
            return Counter(self._slice_table())
        count32 = self._words.count32
        return Counter(
            {slot + 1: count32(g.slice_table_offset, g.slice_count, 4, slot + 1) for slot in slots}
        )

    def publish_demand(
        self, handle: PipeHandle, offered_bytes: int, blocked_ns: int, target: int | None
    ) -> None:
        """The producer's demand counters (and the policy's target) for all to see."""
        off = self._check(handle)
        self._words.store64(off + P_OFFERED, offered_bytes)
        self._words.store64(off + P_BLOCKED_NS, blocked_ns)
        if target is not None:
            self._words.store32(off + P_TARGET, target)

    def end_args(self, handle: PipeHandle, role: int, member: int) -> tuple[int, ...]:
        """What a pipe end of ``handle`` needs (after its region), for ``member``
        as the pipe's producer (``role`` ``P_PRODUCER``) or consumer."""
        off = self._check(handle)
        owner = self._words.load32(off + role)
        if owner != member:
            name = "producer" if role == P_PRODUCER else "consumer"
            raise PoolError(f"pipe {handle}'s {name} is member {owner}, we are {member}")
        g = self.geometry
        return (off, g.data_offset, g.slice_size, g.slice_count, g.max_slices_per_pipe)
