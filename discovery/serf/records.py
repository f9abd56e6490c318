"""Whole records, for the members whose tags cannot carry their endpoints
(or slots).

Such a member answers the ``aiocoloc-record`` query with its
``Member.pack()``.  ``RecordFetcher`` asks the members seen with a tag that
leaves something out, in batches (a query filtered on their names), and
hands each back to the member view (``settle``) with its answer — or
without one if none came before the query's deadline: what its tag left
out then stays unknown for that version of its record, which is not asked
for again.

Serf limits a query response to 1024 bytes (``query_response_size_limit``)
with the node name and some framing: a packed record of more than about 900
bytes cannot be answered, and what the member's tag left out stays unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence

from discovery.member import Member, MemberError, Status
from discovery.serf.rpc import SerfRPC
from discovery.serf.wire import SerfError, SerfMember

__all__ = ["RECORD_QUERY", "RESPONSE_LIMIT", "RecordFetcher", "check_answerable"]

_log = logging.getLogger("discovery.serf.records")

#: The query every engine answers with its ``Member.pack()``.
RECORD_QUERY = "aiocoloc-record"
#: Serf's default limit on one query response, framing included.
RESPONSE_LIMIT = 1024
#: Seconds a burst of members to ask for is gathered before asking.
GATHER = 0.05

Settle = Callable[[SerfMember, Status, Member | None], None]


class RecordFetcher:
    """Asks for the records of the members ``want()`` names."""

    def __init__(
        self, connection: Callable[[], SerfRPC], settle: Settle, counters: Counter[str]
    ) -> None:
        self.timeout = 2.0  # the query's deadline
        self._connection = connection
        self._settle = settle
        self._counters = counters
        self._answers: dict[str, Member] = {}
        self._missed: set[tuple[str, int]] = set()  # (node, incarnation) that did not answer
        self._waiting: dict[str, tuple[SerfMember, Status, int]] = {}
        self._wakeup = asyncio.Event()

    def known(self, node: str, incarnation: int) -> Member | None:
        """``node``'s answer for that version of its record, if any."""
        answer = self._answers.get(node)
        return answer if answer is not None and answer.incarnation == incarnation else None

    def want(self, member: SerfMember, status: Status, incarnation: int) -> bool:
        """Ask for ``member``'s record (and settle it then); False if that
        version did not answer before: settle it now, as it is."""
        if (member.name, incarnation) in self._missed:
            self._waiting.pop(member.name, None)
            return False
        self._waiting[member.name] = (member, status, incarnation)
        self._wakeup.set()
        return True

    def settled(self, node: str) -> None:
        """``node`` needs no answer (any more): it was settled otherwise."""
        self._waiting.pop(node, None)

    def forget(self, node: str) -> None:
        """``node`` is gone."""
        self._waiting.pop(node, None)
        self._answers.pop(node, None)
        self._missed = {m for m in self._missed if m[0] != node}

    async def run(self) -> None:
        """Ask for the records wanted, batch after batch, until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(GATHER)
            batch = dict(self._waiting)
            if not batch:
                continue
            try:
                await self.ask(sorted(batch))
            except SerfError as exc:
                _log.warning("record query failed: %s", exc)
            for node, wanted in batch.items():
                if self._waiting.get(node) != wanted:
                    continue  # seen again meanwhile: settled, or in the next batch
                del self._waiting[node]
                member, status, incarnation = wanted
                answer = self.known(node, incarnation)
                if answer is None:
                    self._missed.add((node, incarnation))
                    self._counters["fetch_misses"] += 1
                    _log.warning("no record from %s: its endpoints stay unknown", node)
                self._settle(member, status, answer)

    async def ask(self, nodes: Sequence[str]) -> dict[str, Member]:
        """Send the record query to ``nodes``; their answers by node."""
        rpc = self._connection()
        wanted = set(nodes)
        answers: dict[str, Member] = {}
        stream = await rpc.query(RECORD_QUERY, filter_nodes=sorted(wanted), timeout=self.timeout)
        try:
            async for reply in stream:
                if reply.kind != "response" or reply.source not in wanted:
                    continue
                try:
                    member = Member.unpack(reply.payload)
                except MemberError as exc:
                    _log.warning("bad record from %s: %s", reply.source, exc)
                    continue
                if member.node != reply.source:
                    _log.warning("%s answered for %s", reply.source, member.node)
                    continue
                answers[member.node] = self._answers[member.node] = member
                self._counters["records_fetched"] += 1
                if answers.keys() == wanted:
                    break
        finally:
            await stream.close()
        return answers


def check_answerable(local: Member) -> None:
    """Warn about a record too large for Serf's query responses."""
    size = len(local.pack())
    if size > RESPONSE_LIMIT - 128:
        _log.warning(
            "%s: record of %d bytes: too large for a Serf query response, "
            "its endpoints reach only those that read them in its tag",
            local.node,
            size,
        )
