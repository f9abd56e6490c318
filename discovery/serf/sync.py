"""Keeping a Serf engine's members in step with its agent: ``MemberSync``.

Serf's event stream is a hint, not a ledger: the agent drops events when
the 512-event buffer of a client fills, and nothing flows while the
connection is down.  So the engine reads the member list again (a *resync*)
after every (re)connection, every ``resync_interval`` seconds, whenever its
own queue overflowed, and whenever the agent's log says it dropped events
for this connection; ``MemberTable`` turns the differences into the events
that were missed.

Serf coalesces member events (a quiet second, three at most) before it
streams them, so events come about a second after the change; a resync may
publish a change first, and the late event then changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from discovery.engine import EngineError
from discovery.serf.records import RECORD_QUERY
from discovery.serf.wire import MemberEvent, QueryEvent, SerfError, StreamGap

if TYPE_CHECKING:
    from discovery.member import Member
    from discovery.serf.rpc import SerfRPC
    from discovery.serf.streams import RecordStream
    from discovery.serf.view import MemberView
    from discovery.serf.wire import StreamRecord

__all__ = ["STREAM_FILTER", "MemberSync"]

_log = logging.getLogger("discovery.serf.engine")

#: What the engine subscribes to.
STREAM_FILTER = (
    "member-join,member-leave,member-failed,member-update,member-reap,query:" + RECORD_QUERY
)


class MemberSync:
    """Reads the agent's event stream into ``view`` and resyncs it with the
    agent's member list; answers the record query on the stream with
    ``local()`` while ``answering()``."""

    def __init__(
        self,
        view: MemberView,
        counters: Counter[str],
        *,
        local: Callable[[], Member],
        answering: Callable[[], bool],
    ) -> None:
        self._view = view
        self._counters = counters
        self._local = local
        self._answering = answering
        self._lock = asyncio.Lock()

    async def subscribe(self, rpc: SerfRPC) -> RecordStream[StreamRecord]:
        """The event stream ``follow`` reads, opened on ``rpc``."""
        return await rpc.stream(STREAM_FILTER)

    async def resync(self, rpc: SerfRPC) -> int:
        """Read the agent's member list and publish what changed since the
        last look; how many events that made."""
        async with self._lock:
            snapshot = await rpc.members()
            self._counters["resyncs"] += 1
            return self._view.apply_snapshot(snapshot)

    async def follow(
        self, rpc: SerfRPC, stream: RecordStream[StreamRecord], interval: float
    ) -> None:
        """Read ``stream`` (opened on ``rpc``) until the connection fails,
        resyncing every ``interval`` seconds, after a gap in the stream, and
        when the agent logs dropping events for ``rpc``."""
        watcher = asyncio.create_task(self._watch_drops(rpc))
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + interval
        try:
            while True:
                try:
                    record = await stream.get(max(0.0, next_resync - loop.time()))
                except TimeoutError:
                    await self.resync(rpc)
                    next_resync = loop.time() + interval
                    continue
                self._counters["records"] += 1
                if isinstance(record, MemberEvent):
                    self._view.apply_event(record)
                elif isinstance(record, QueryEvent):
                    await self._answer(rpc, record)
                elif isinstance(record, StreamGap):
                    self._counters["gaps"] += 1
                    await self.resync(rpc)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_drops(self, rpc: SerfRPC) -> None:
        """Resync at once when the agent logs dropping events for us."""
        try:
            sockname = rpc.local_address
            logs = await rpc.monitor("WARN")
            async for line in logs:
                if "Dropping event" in line and line.rstrip().endswith(" " + sockname):
                    self._counters["gaps"] += 1
                    await self.resync(rpc)
        except (SerfError, EngineError) as exc:
            _log.debug("%s: log watch ended: %s", self._local().node, exc)

    async def _answer(self, rpc: SerfRPC, query: QueryEvent) -> None:
        if query.name != RECORD_QUERY or not self._answering():
            return
        try:
            await rpc.respond(query.id, self._local().pack())
            self._counters["queries_answered"] += 1
        except SerfError as exc:  # too large, or the deadline passed
            _log.warning("%s: cannot answer %r: %s", self._local().node, RECORD_QUERY, exc)
