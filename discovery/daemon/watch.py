"""Co-located sidecars watch each other through the pools they share.

Gossip needs a few probe rounds to be sure a member is dead; a co-located
peer's death is visible sooner in the pool both map.  For every live peer
whose slot tag (``discovery.daemon.slots``) names a member of a pool we map,
the watch keeps that slot in view and declares the peer failed when

- its process exits while its slot is still taken (``pidfd_open`` on the
  pid in its member entry, when the peer's kernel fingerprint is ours: the
  pid then means the same process) -- at once; or
- its heartbeat stalls for three of its beats (3/4 of the pool's lease, by
  our clock: ``aiocoloc.shm.staleness``), before the pool itself would
  reclaim the slot -- across kernels.

A peer declared failed for a stalled heartbeat stays in view: if its
heartbeat moves again (a VM paused and resumed), it is revived.  A slot that
is freed is a peer that left the pool cleanly (a detach, or a graceful exit,
which leaves the pools after the gossip ``leave``): no verdict, gossip tells
the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiocoloc.errors import PoolError
from aiocoloc.shm.staleness import Observed
from discovery.daemon.pools import MappedPool, PoolSet
from discovery.daemon.slots import slot_tags
from discovery.member import Member

__all__ = ["PoolWatch"]

_log = logging.getLogger("discovery.daemon.watch")

#: A heartbeat unchanged for this fraction of the pool's lease is a death.
STALE_FRACTION = 0.75


@dataclass
class _Watched:
    """One peer's slot in one pool."""

    member: Member
    pool: MappedPool
    slot: int
    generation: int
    pid: int
    beats: Observed = field(default_factory=Observed)
    pidfd: int | None = None


class PoolWatch:
    """Watches co-located peers' pool slots: ``on_failed(member, reason)``
    for each that dies; ``on_revived(member, reason)`` for one declared failed
    for a stalled heartbeat whose heartbeat moves again (a paused VM, a
    process stopped and continued) while ``declared(node)`` still holds."""

    def __init__(
        self,
        pools: PoolSet,
        peers: Callable[[], list[Member]],
        on_failed: Callable[[Member, str], None],
        on_revived: Callable[[Member, str], None],
        declared: Callable[[str], bool],
        *,
        fingerprint: bytes,
        interval: float,
    ) -> None:
        self._pools = pools
        self._peers = peers
        self._on_failed = on_failed
        self._on_revived = on_revived
        self._declared = declared
        self._fingerprint = fingerprint
        self._interval = interval
        self._watched: dict[uuid.UUID, _Watched] = {}
        # Slots of peers declared failed for a stalled heartbeat, still looked at.
        self._stalled: dict[uuid.UUID, _Watched] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for member_id in list(self._watched):
            self._forget(member_id)
        self._stalled.clear()

    def watched(self) -> dict[str, int]:
        """How many slots are watched, by node (for status)."""
        out: dict[str, int] = {}
        for w in self._watched.values():
            out[w.member.node] = out.get(w.member.node, 0) + 1
        return out

    async def _run(self) -> None:
        while True:
            try:
                self.scan()
            except Exception:  # a broken pool must not end the watch
                _log.exception("pool watch failed; trying again")
            await asyncio.sleep(self._interval)

    def scan(self) -> None:
        """One look at every shared pool's member table."""
        now = time.monotonic()
        tables: dict[str, tuple[MappedPool, dict[uuid.UUID, dict[str, Any]]]] = {}
        for mapped in self._pools.mapped():
            try:
                entries = mapped.pool.members()
            except PoolError as exc:
                _log.warning("pool %s: cannot read its member table: %s", mapped.name, exc)
                continue
            tables[mapped.id] = (mapped, {e["endpoint"]: e for e in entries})
        self._look_at_stalled(tables)
        wanted: dict[tuple[str, uuid.UUID], tuple[Member, bytes]] = {}
        for member in self._peers():
            for pool_id, tag in slot_tags(member).items():
                wanted[pool_id, tag.member_id] = (member, tag.fingerprint)
        seen: set[uuid.UUID] = set()
        for mapped, by_id in tables.values():
            for member_id, entry in by_id.items():
                if (mapped.id, member_id) not in wanted or member_id in seen:
                    continue
                member, fingerprint = wanted[mapped.id, member_id]
                seen.add(member_id)
                watched = self._watched.get(member_id)
                if watched is None or watched.generation != entry["generation"]:
                    if watched is not None:
                        self._forget(member_id)
                    watched = self._watch(member_id, member, mapped, entry, fingerprint)
                    if watched is None:
                        return  # declared failed: the peer list changed
                watched.member, watched.pool = member, mapped
                # The member beats every lease/4 and the pool reclaims its
                # slot after a lease: judged at three missed beats, before
                # the slot can be reclaimed (which would look like a leave).
                stale = STALE_FRACTION * mapped.pool.lease
                if watched.beats.unchanged_for(entry["heartbeat"], now, stale):
                    self._fail(
                        member_id,
                        f"its heartbeat in pool {mapped.name} stalled for {stale:g} s",
                        stalled=True,
                    )
                    return
        for member_id in set(self._watched) - seen:
            # The slot was freed (a clean leave of the pool), the pool was
            # unmapped, or the member is no longer alive for us.
            self._forget(member_id)

    def _look_at_stalled(
        self, tables: dict[str, tuple[MappedPool, dict[uuid.UUID, dict[str, Any]]]]
    ) -> None:
        for member_id, watched in list(self._stalled.items()):
            table = tables.get(watched.pool.id)
            entry = table[1].get(member_id) if table is not None else None
            if (
                not self._declared(watched.member.node)
                or entry is None
                or entry["generation"] != watched.generation
            ):
                del self._stalled[member_id]  # settled by gossip, or gone from the pool
            elif entry["heartbeat"] != watched.beats.value:
                del self._stalled[member_id]
                self._on_revived(
                    watched.member, f"its heartbeat in pool {watched.pool.name} moves again"
                )

    def _watch(
        self,
        member_id: uuid.UUID,
        member: Member,
        mapped: MappedPool,
        entry: dict[str, Any],
        fingerprint: bytes,
    ) -> _Watched | None:
        slot, generation, pid = int(entry["slot"]), int(entry["generation"]), int(entry["pid"])
        watched = _Watched(member, mapped, slot, generation, pid)
        self._watched[member_id] = watched
        _log.debug("watching %s: pool %s slot %d pid %d", member.node, mapped.name, slot, pid)
        if self._fingerprint and fingerprint == self._fingerprint and pid > 0:
            try:
                watched.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._fail(
                    member_id, f"its process {pid} is gone but holds its slot in pool {mapped.name}"
                )
                return None
            except OSError as exc:  # no pidfd (old kernel, seccomp): the heartbeat will do
                _log.debug("cannot watch pid %d of %s: %s", pid, member.node, exc)
            else:
                assert self._loop is not None
                self._loop.add_reader(watched.pidfd, self._process_exited, member_id)
        return watched

    def _process_exited(self, member_id: uuid.UUID) -> None:
        watched = self._watched.get(member_id)
        if watched is None:
            return
        if watched.pidfd is not None:
            assert self._loop is not None
            self._loop.remove_reader(watched.pidfd)
        # Only a slot still taken after the exit is a death: a sidecar that
        # exits gracefully leaves its pools first.  (A pool no longer in the
        # set may be unmapped already: not read.)
        entries: list[dict[str, Any]] = []
        if any(mapped is watched.pool for mapped in self._pools.mapped()):
            with contextlib.suppress(PoolError):
                entries = watched.pool.pool.members()
        if any(
            e["endpoint"] == member_id and e["generation"] == watched.generation for e in entries
        ):
            self._fail(
                member_id,
                f"its process {watched.pid} exited without leaving pool {watched.pool.name}",
            )
        else:
            self._forget(member_id)

    def _fail(self, member_id: uuid.UUID, reason: str, *, stalled: bool = False) -> None:
        watched = self._watched[member_id]
        for other in [k for k, w in self._watched.items() if w.member.node == watched.member.node]:
            self._forget(other)
        if stalled:
            self._stalled[member_id] = watched
        self._on_failed(watched.member, reason)

    def _forget(self, member_id: uuid.UUID) -> None:
        watched = self._watched.pop(member_id, None)
        if watched is not None and watched.pidfd is not None:
            assert self._loop is not None
            self._loop.remove_reader(watched.pidfd)
            os.close(watched.pidfd)
            watched.pidfd = None
