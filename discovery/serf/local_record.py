"""The local member's record as a Serf engine keeps it: ``LocalRecord``.

The record is in the member table (for ``members()``) and in the agent's
tags (``discovery.serf.tags``), where the others read it.  Each change is a
new incarnation; changes go one at a time, so the tags follow the order of
the records.  While the engine is not connected, a change goes to the table
only, and ``publish`` puts it in the tags on reconnection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from discovery.engine import EngineError
from discovery.member import Member, MemberError, Status
from discovery.serf.records import check_answerable
from discovery.serf.tags import TAG, record_tags

if TYPE_CHECKING:
    from discovery.serf.agent import SerfAgent
    from discovery.serf.rpc import SerfRPC
    from discovery.serf.view import MemberTable

__all__ = ["LocalRecord"]


class LocalRecord:
    """The local member's record in ``table`` and in the tags of the agent
    reached through ``connection()`` (None: not connected); ``agent``: our
    own agent, if it is ours, which starts again with the last tags.  The
    tags carry our record only while ``announcing()``."""

    def __init__(
        self,
        table: MemberTable,
        agent: SerfAgent | None,
        connection: Callable[[], SerfRPC | None],
        announcing: Callable[[], bool],
    ) -> None:
        self._table = table
        self._agent = agent
        self._connection = connection
        self._announcing = announcing
        self._lock = asyncio.Lock()  # tag writes in the order of the records

    @property
    def member(self) -> Member:
        """The record as it is now."""
        return self._table.local

    async def update(
        self,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        """A new incarnation with these changes (None: keep), in the tags
        at once if connected; the new record."""
        async with self._lock:
            old = self._table.local
            try:
                new = old.changed(
                    max(old.incarnation + 1, time.time_ns() // 1_000_000),
                    pools=pools,
                    endpoints=endpoints,
                    slots=slots,
                )
            except MemberError as exc:
                raise EngineError(str(exc)) from None
            others = await self._other_tags()
            tags = record_tags(new, others)
            check_answerable(new)
            rpc = self._connection()
            if rpc is not None:
                await rpc.update_tags(tags)
            # else: set on reconnection (publish).
            self._table.local = new
            if self._agent is not None:
                self._agent.tags = dict(tags)  # a restarted agent starts with them
            return new

    async def publish(self, rpc: SerfRPC) -> None:
        """Make the agent's view of us ours: address, and tag if it differs."""
        async with self._lock:
            for member in await rpc.members():
                if member.name == self._table.local.node:
                    local = replace(self._table.local, addresses=(member.address,))
                    self._table.local = local
                    if self._agent is not None:
                        self._agent.pin_gossip_port(member.port)
                    tags = record_tags(local, member.tags)
                    if member.tags.get(TAG) != tags[TAG] and self._announcing():
                        await rpc.update_tags(tags)
                    return

    async def withdraw(self, rpc: SerfRPC) -> None:
        """Take our record out of the agent's tags: the others see us leave
        (for an attached agent, which is not ours to stop)."""
        await rpc.update_tags(delete=[TAG])

    def mark_left(self) -> None:
        """We left the cluster."""
        self._table.local = self._table.local.with_status(Status.LEFT)

    async def _other_tags(self) -> dict[str, str]:
        """The agent's tags other than ours (they count in the 512 bytes)."""
        rpc = self._connection()
        if rpc is None or self._agent is not None:
            return {}
        for member in await rpc.members():
            if member.name == self._table.local.node:
                return {k: v for k, v in member.tags.items() if k != TAG}
        return {}
