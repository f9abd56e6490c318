"""``Pool``: this process's membership of a shared-memory pool.

The facade of the shared-memory layer.  It owns the life cycle -- format or
attach, join, leave, unmap -- hands out pipe ends and counts; the rest is
composed: the region's layout (``layout``), the member table and this
process's membership with its heartbeat and the allocator lock taken
in its name (``members``, ``lock``), and the pipe and slice tables
(``pipes``).  The pool layout and its rules are documented in
``aiocoloc.shm.layout``.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from contextlib import AbstractContextManager
from typing import Any

from aiocoloc import debug, ring
from aiocoloc.errors import PoolBusy, PoolError, SegmentError
from aiocoloc.shm.atomic import SharedWords, atomics_are_process_safe
from aiocoloc.shm.layout import (
    HEADER_SIZE,
    P_CONSUMER,
    P_PRODUCER,
    PoolConfig,
    PoolGeometry,
    format_pool,
    reset_if_abandoned,
    validate,
)
from aiocoloc.shm.lock import on_event_loop
from aiocoloc.shm.members import Membership, MemberTable
from aiocoloc.shm.pipes import PipeHandle, PipeInfo, PipeTable
from aiocoloc.shm.segments import PosixShmSegment, Segment, UnlinkPolicy

__all__ = ["Pool"]

_log = logging.getLogger("aiocoloc.shm.pool")


class Pool:
    """This process's membership of a shared-memory pool.

    Create one with ``Pool.create`` (format a fresh segment), ``Pool.attach``
    (an existing one) or ``Pool.open_posix`` (create-or-attach a named POSIX
    pool, race-free).  The pool joins as a member, heartbeats (the process's
    heartbeat thread, ``aiocoloc.shm.heartbeat``) and reclaims dead members;
    ``close()`` leaves it.
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
        self._pipes = PipeTable(region, self._words, geometry, str(pool_id))
        self._members = MemberTable(region, self._words, geometry, lease, self._pipes, str(pool_id))
        self._membership = Membership(self._words, self._members, self._pipes, lease, pool_id)
        self._ends: weakref.WeakSet[Any] = weakref.WeakSet()
        if not atomics_are_process_safe():
            _log.warning(
                "pool %s: compiled atomics unavailable (AIOCOLOC_NO_EXTENSIONS?); "
                "the pool is only safe within this process",
                pool_id,
            )
        try:
            self._membership.join()  # and start beating
        except BaseException:
            self._words.release()
            raise

    # -- creating and attaching -------------------------------------------------

    @classmethod
    def create(
        cls, segment: Segment, config: PoolConfig | None = None, *, close_segment: bool = True
    ) -> Pool:
        """Format ``segment`` as a new pool and join it."""
        config = config or PoolConfig()
        geometry = PoolGeometry.plan(segment.size, config)
        region = segment.map()
        try:
            pool_id = format_pool(region, segment, geometry, config.lease)
            _log.info(
                "created pool %s on %s: %d slices of %d bytes",
                pool_id,
                segment.identity,
                geometry.slice_count,
                geometry.slice_size,
            )
            return cls(
                segment, region, geometry, pool_id, config.lease, close_segment=close_segment
            )
        except BaseException:
            # Unmapped if formatting or joining fails (``PoolBusy`` on an event
            # loop while another member holds the lock, ``PoolExhausted``
            # without a free member slot).
            region.close()
            raise

    @classmethod
    def attach(cls, segment: Segment, *, timeout: float = 5.0, close_segment: bool = True) -> Pool:
        """Join the pool on ``segment``, waiting up to ``timeout`` for its creator."""
        region = segment.map()
        try:
            geometry, pool_id, lease = validate(region, segment, timeout)
            return cls(segment, region, geometry, pool_id, lease, close_segment=close_segment)
        except BaseException:
            region.close()  # as in create()
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
            # Its creator may not have sized it yet (shm_open, then ftruncate).
            segment = PosixShmSegment.attach(name, min_size=HEADER_SIZE, wait=timeout)
            try:
                return cls.attach(segment, timeout=timeout)
            except PoolError:
                if not reset_if_abandoned(segment):
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

    @property
    def slot(self) -> int:
        """Our slot in the member table."""
        return self._membership.slot

    @property
    def generation(self) -> int:
        """Our member generation (bumped at each join of the slot)."""
        return self._membership.generation

    @property
    def endpoint_id(self) -> uuid.UUID:
        """This member's id, written in its member entry."""
        return self._membership.endpoint_id

    def members(self) -> list[dict[str, Any]]:
        """Active members: slot, generation, endpoint id, pid, heartbeat."""
        return self._members.entries()

    def beat(self) -> None:
        """Advance this member's heartbeat (the heartbeat thread does it)."""
        self._membership.beat()

    def reap(self, lock_timeout: float | None = None) -> list[int]:
        """Reclaim members whose heartbeat stalled for a lease; returns their
        slots.  ``lock_timeout``: as ``locked()``'s."""
        return self._membership.reap(lock_timeout)

    def locked(self, timeout: float | None = None) -> AbstractContextManager[None]:
        """Hold the pool's allocator lock (across processes and threads).

        Waits up to ``timeout`` seconds, by default three leases, or on an
        event loop's thread well under a millisecond (``aiocoloc.shm.lock``:
        a loop never waits on another member), then raises ``PoolBusy``.
        """
        return self._membership.locked(timeout)

    # -- pipes ----------------------------------------------------------------

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
        most, first = self._pipes.bounds(producer, consumer, min_slices, max_slices, initial)
        with self.locked():
            for member in (producer, consumer):
                if not self._members.active(member):
                    raise PoolError(f"member {member} is not attached to pool {self.id}")
            return self._pipes.create_locked(producer, consumer, min_slices, most, first)

    def destroy_pipe(self, handle: PipeHandle) -> int:
        """Free the pipe and all its slices; returns how many slices were freed.

        On an event loop's thread, when another member holds the allocator
        lock, the pool's own thread frees the pipe as soon as it can (0 is
        returned): closing a connection never waits for another member.
        """
        try:
            with self.locked():
                return self._pipes.destroy_locked(handle)
        except PoolBusy:
            if not on_event_loop():
                raise
        self._pipes.defer(handle)  # gone already: says so now
        self._membership.wake()
        return 0

    def allocate_slices(self, handle: PipeHandle, count: int) -> list[int]:
        """Give the pipe up to ``count`` more free slices (fewer if the pool or
        the pipe's maximum runs out); returns their indices."""
        if count <= 0:
            return []
        with self.locked():
            return self._pipes.allocate_locked(handle, count)

    def release_slices(self, handle: PipeHandle, indices: list[int]) -> None:
        """Hand slices back that the pipe's layout no longer uses."""
        with self.locked():
            self._pipes.release_locked(handle, indices)

    def slice_owners(self) -> list[int]:
        """For each slice, the owning pipe slot, or -1 when free."""
        return self._pipes.slice_owners()

    def free_slice_count(self) -> int:
        """Slices no pipe owns right now (a snapshot: others may be allocating)."""
        return self._pipes.free_slice_count()

    def has_pipe(self, handle: PipeHandle) -> bool:
        """Whether the pipe is still active (not closing, not freed, not
        another pipe in its entry)."""
        return self._pipes.is_active(handle)

    def has_room_for(self, pipes: int) -> bool:
        """Whether ``pipes`` new pipes of one slice each fit now (a snapshot:
        others may be allocating)."""
        return self._pipes.free_slice_count() >= pipes and self._pipes.has_free_entries(pipes)

    def pipes(self) -> list[PipeInfo]:
        """Snapshots of every active pipe: one pass over each table."""
        return self._pipes.infos()

    def publish_demand(
        self, handle: PipeHandle, offered_bytes: int, blocked_ns: int, target: int | None = None
    ) -> None:
        """The producer's demand counters (and the policy's target) for all to see."""
        self._pipes.publish_demand(handle, offered_bytes, blocked_ns, target)

    def pipe_producer(self, handle: PipeHandle) -> Any:
        """The writing end of a pipe whose producer is this member."""
        end = ring.PipeProducer(self._region, *self._pipes.end_args(handle, P_PRODUCER, self.slot))
        self._ends.add(end)
        debug.track_end(end)
        return end

    def pipe_consumer(self, handle: PipeHandle) -> Any:
        """The reading end of a pipe whose consumer is this member."""
        end = ring.PipeConsumer(self._region, *self._pipes.end_args(handle, P_CONSUMER, self.slot))
        self._ends.add(end)
        debug.track_end(end)
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
        """True once ``close()`` was called (leaving may still be finishing)."""
        return self._membership.leaving

    def close(self) -> None:
        """Leave the pool: destroy our pipes, free our slot, unmap.  Idempotent.

        On an event loop's thread, when another member holds the allocator
        lock, a thread of ours finishes leaving once it gets the lock.
        """
        if self._membership.leaving:
            return
        self._membership.stop()
        for end in list(self._ends):
            end.release()
        self._membership.leave(then=self._unmap)

    def _unmap(self) -> None:
        self._pipes.detach()
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
