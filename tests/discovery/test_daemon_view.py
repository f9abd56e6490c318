"""The membership the sidecar serves: the engine's events relayed (those
that change only slot tags left out), and the pool watch's early ``failed``
laid over them (said once, undone by a newer record)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from discovery.daemon.slots import SlotTag
from discovery.daemon.view import MembershipView
from discovery.engine import Engine
from discovery.events import Event, Subscription
from discovery.member import Member, Status

TAG = SlotTag(uuid.uuid4(), b"fp").encode()
ME = Member("me", ("127.0.0.2:7946",))
PEER = Member(
    "peer", ("127.0.0.3:7946",), frozenset({"p1"}), ("tcp:x",), incarnation=2, slots={"p1": TAG}
)


class ListEngine(Engine):
    """An engine whose membership the test sets by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.records = {ME.node: ME}

    async def start(self) -> None:
        pass

    async def join(self, addresses: Sequence[str]) -> int:
        return 0

    async def leave(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def local(self) -> Member:
        return self.records[ME.node]

    def members(self) -> list[Member]:
        return list(self.records.values())

    async def update_local(
        self,
        *,
        pools: frozenset[str] | None = None,
        endpoints: Sequence[str] | None = None,
        slots: Mapping[str, bytes] | None = None,
    ) -> Member:
        return self.local()

    def happen(self, kind: str, member: Member, previous: Member | None = None) -> None:
        self.records[member.node] = member
        self.events.publish(Event(kind, member, previous))  # type: ignore[arg-type]


async def _drain(events: Subscription, count: int) -> list[Event]:
    return [await asyncio.wait_for(events.get(), 2) for _ in range(count)]


@pytest.mark.asyncio
async def test_relay_and_watch_verdicts() -> None:
    engine = ListEngine()
    view = MembershipView(engine)
    view.start()
    events = view.subscribe()
    try:
        engine.happen("join", PEER)
        (joined,) = await _drain(events, 1)
        assert joined.kind == "join" and joined.member.endpoints == ("tcp:x",)
        assert [m.endpoints for m in view.members() if m.node == "peer"] == [("tcp:x",)]
        assert "slots" not in joined.member.to_json()  # what clients get
        assert view.watchable() == [PEER]  # the watch sees the tags
        # Only the tag changed (a pool re-joined): nothing for clients.
        moved = PEER.changed(3, slots={"p1": SlotTag(uuid.uuid4(), b"fp").encode()})
        engine.happen("update", moved, PEER)
        # The pool watch sees it die first.
        view.declare_failed(moved, "its process exited")
        (failed,) = await _drain(events, 1)
        assert (failed.kind, failed.member.status, failed.member.endpoints) == (
            "failed",
            Status.FAILED,
            ("tcp:x",),
        )
        assert {m.node: m.status for m in view.members()}["peer"] is Status.FAILED
        assert view.watchable() == []
        view.declare_failed(moved, "again")  # said once
        # Gossip confirms: not repeated.  Then the node comes back: a join.
        engine.happen("failed", moved.with_status(Status.FAILED))
        reborn = replace(moved, incarnation=9)
        engine.happen("join", reborn)
        (back,) = await _drain(events, 1)
        assert back.kind == "join" and back.member.incarnation == 9
        # A verdict the member refutes (newer incarnation) comes out as join.
        view.declare_failed(reborn, "heartbeat stalled")
        engine.happen("update", replace(reborn, incarnation=8), reborn)  # old news: dropped
        engine.happen("update", replace(reborn, incarnation=10), reborn)
        kinds = [(e.kind, e.member.incarnation) for e in await _drain(events, 2)]
        assert kinds == [("failed", 9), ("join", 10)]
        # A stalled heartbeat that moves again: the watch revives the member.
        view.declare_failed(replace(reborn, incarnation=10), "heartbeat stalled")
        assert view.declared_failed("peer")
        view.revive(reborn, "heartbeat moves again")
        view.revive(reborn, "twice")  # said once
        kinds = [(e.kind, e.member.status) for e in await _drain(events, 2)]
        assert kinds == [("failed", Status.FAILED), ("join", Status.ALIVE)]
        assert not view.declared_failed("peer")
        assert events.get_nowait() is None
    finally:
        await view.stop()
