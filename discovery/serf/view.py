"""The members as a Serf engine last saw them, and the events changes make.

Everything the agent tells (an event-stream record, a ``members`` snapshot)
goes through ``MemberTable.apply``: it compares the new record with the one
known and returns the event that difference is — so an event seen twice
(in the stream and in a snapshot taken during a resync) is published once,
and a snapshot taken after a gap publishes exactly what was missed.

* not a member (or left/failed) -> alive: ``join``;
* alive -> left: ``leave``; alive -> failed: ``failed``;
* alive -> alive with another record (pools, endpoints, slots, address,
  incarnation): ``update``;
* a member that vanishes from a snapshot, or is reaped, while alive:
  ``failed``; one whose ``ac`` tag vanishes (an engine that detached from a
  shared agent): ``leave``.

The local member is in the table (for ``members()``) but makes no events.

``MemberView`` is the way in: it reads each member's ``ac`` tag and status,
forgets those that are not (or no longer) ours, and holds back one whose tag
leaves something out until its whole record came (``discovery.serf.records``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from discovery.engine import EngineError
from discovery.events import Event
from discovery.member import Member, MemberError, Status
from discovery.serf.records import RECORD_QUERY, RecordFetcher
from discovery.serf.tags import TAG, TagRecord, decode_tag
from discovery.serf.wire import SerfMember

if TYPE_CHECKING:
    from discovery.events import EventStream
    from discovery.serf.rpc import SerfRPC
    from discovery.serf.wire import MemberEvent

__all__ = ["MemberTable", "MemberView", "read_tag", "serf_status"]

_log = logging.getLogger("discovery.serf.view")

#: Serf's statuses as ours; a leaving member is still one ("none": unknown).
_STATUS = {
    "alive": Status.ALIVE,
    "leaving": Status.ALIVE,
    "left": Status.LEFT,
    "failed": Status.FAILED,
}
#: The status a member event implies, whatever the member's own says.
EVENT_STATUS = {"member-leave": Status.LEFT, "member-failed": Status.FAILED}


def serf_status(member: SerfMember, event: str | None = None) -> Status | None:
    """Our status for a Serf member (as told by ``event`` if given)."""
    if event in EVENT_STATUS:
        return EVENT_STATUS[event]
    return _STATUS.get(member.status)


def read_tag(member: SerfMember) -> TagRecord | None:
    """The member's ``ac`` tag, None if it has none (not one of ours) or an
    unreadable one."""
    value = member.tags.get(TAG)
    if value is None:
        return None
    try:
        return decode_tag(value)
    except MemberError as exc:
        _log.warning("%s: ignoring its %r tag: %s", member.name, TAG, exc)
        return None


class MemberTable:
    """The members by node name, as records of ours."""

    def __init__(self, local: Member) -> None:
        self.local = local
        self._records: dict[str, Member] = {}

    def members(self) -> list[Member]:
        records = dict(self._records)
        records[self.local.node] = self.local
        return [records[node] for node in sorted(records)]

    def get(self, node: str) -> Member | None:
        return self.local if node == self.local.node else self._records.get(node)

    def names(self) -> set[str]:
        return set(self._records)

    def record(
        self, member: SerfMember, tag: TagRecord, status: Status, full: Member | None
    ) -> Member:
        """Our record of ``member``: its tag, with what the tag left out
        (endpoints, slots) from ``full``, its answer to the record query."""
        endpoints, slots = tag.endpoints, tag.slots
        addresses: tuple[str, ...] = (member.address,)
        if full is not None and full.incarnation == tag.incarnation:
            endpoints = full.endpoints if endpoints is None else endpoints
            slots = full.slots if slots is None else slots
            addresses += tuple(a for a in full.addresses if a != member.address)
        known = self._records.get(member.name)
        if known is not None and known.incarnation == tag.incarnation:
            # not known yet: keep what we had for this version
            endpoints = known.endpoints if endpoints is None else endpoints
            slots = known.slots if slots is None else slots
        return Member(
            node=member.name,
            addresses=addresses,
            pools=tag.pools,
            endpoints=endpoints or (),
            incarnation=tag.incarnation,
            status=status,
            slots={pool: data for pool, data in (slots or {}).items() if pool in tag.pools},
        )

    def apply(self, new: Member, *, ordered: bool = False) -> Event | None:
        """Record ``new``; the event the change is, if any.  ``ordered``: it
        comes from the event stream, which may lag behind a snapshot
        already applied, so a record older than the one known is dropped."""
        if new.node == self.local.node:
            return None
        old = self._records.get(new.node)
        if ordered and old is not None and old.alive and new.incarnation < old.incarnation:
            _log.debug(
                "%s: stale record %d < %d dropped", new.node, new.incarnation, old.incarnation
            )
            return None
        self._records[new.node] = new
        if old is None or not old.alive:
            return Event("join", new) if new.alive else None
        if not new.alive:
            return Event("leave" if new.status is Status.LEFT else "failed", new)
        if new != old:
            return Event("update", new, previous=old)
        return None

    def remove(self, node: str, status: Status = Status.FAILED) -> Event | None:
        """Forget ``node`` (reaped, untagged, or not in a snapshot); an event
        if it was still a member."""
        old = self._records.pop(node, None)
        if old is None or not old.alive:
            return None
        gone = old.with_status(status)
        return Event("leave" if status is Status.LEFT else "failed", gone)

    def vanished(self, present: Iterable[str]) -> list[str]:
        """Known nodes that are not in ``present`` (a snapshot's names)."""
        return sorted(self.names() - set(present))


class MemberView:
    """What the agent tells about the members, folded into ``table`` and
    published on ``events``; ``records`` fetches the records that tags
    leave incomplete."""

    def __init__(
        self,
        table: MemberTable,
        events: EventStream,
        connection: Callable[[], SerfRPC],
        counters: Counter[str],
    ) -> None:
        self.table = table
        self.records = RecordFetcher(connection, self._settle, counters)
        self._events = events

    def apply_event(self, event: MemberEvent) -> None:
        """Fold in a member event of the agent's event stream."""
        for member in event.members:
            if event.event == "member-reap":
                self._forget(member.name, Status.FAILED)
            else:
                self._observe(member, event.event)

    def apply_snapshot(self, snapshot: Iterable[SerfMember]) -> int:
        """Fold in the agent's whole member list (``members``): a member not
        in it is gone.  How many events that made."""
        before = self._events.published
        present = set()
        for member in snapshot:
            present.add(member.name)
            self._observe(member, None)
        for node in self.table.vanished(present):
            self._forget(node, Status.FAILED)
        return self._events.published - before

    async def fetch(self, node: str) -> Member:
        """``node``'s whole record, asked with the record query, with the
        status known for it."""
        answers = await self.records.ask([node])
        if node not in answers:
            raise EngineError(f"{node!r} did not answer the {RECORD_QUERY!r} query")
        known = self.table.get(node)
        return answers[node].with_status(known.status if known is not None else Status.ALIVE)

    def _publish(self, event: Event | None) -> None:
        if event is not None:
            self._events.publish(event)

    def _forget(self, node: str, status: Status) -> None:
        """``node`` is no member any more (reaped, vanished, untagged)."""
        self.records.forget(node)
        self._publish(self.table.remove(node, status))

    def _observe(self, member: SerfMember, event: str | None) -> None:
        """Fold one member as the agent sees it into the table; one whose
        tag leaves something out is published once its record is fetched."""
        if member.name == self.table.local.node:
            return
        status = serf_status(member, event)
        tag = read_tag(member)
        if tag is None or status is None:  # not (or no longer) one of ours
            self._forget(member.name, Status.LEFT)
            return
        full = self.records.known(member.name, tag.incarnation)
        if not tag.complete and status is Status.ALIVE and full is None:
            if self.records.want(member, status, tag.incarnation):
                return
        self.records.settled(member.name)
        self._settle(member, status, full, ordered=event is not None)

    def _settle(
        self, member: SerfMember, status: Status, full: Member | None, *, ordered: bool = True
    ) -> None:
        tag = read_tag(member)
        if tag is not None:
            record = self.table.record(member, tag, status, full)
            self._publish(self.table.apply(record, ordered=ordered))
