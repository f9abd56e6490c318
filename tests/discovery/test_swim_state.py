"""The member table's state machine (``discovery.swim.state``), message by
message, with the network replaced by a list of what it would send."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from discovery.events import Event, EventStream
from discovery.member import Member, Status
from discovery.profiles import PROFILES
from discovery.swim.awareness import Awareness
from discovery.swim.messages import Alive, Dead, Message, Suspect, decode_body, pack_body
from discovery.swim.state import Membership

_PROFILE = PROFILES["host"].with_changes(suspicion_mult=4)  # k = 2, n >= 4


@dataclass
class Table:
    membership: Membership
    awareness: Awareness
    stats: Counter[str]
    sent: list[tuple[str, Message]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def status(self, node: str) -> tuple[Status, int]:
        state = self.membership.get(node)
        assert state is not None
        return state.status, state.member.incarnation

    def take_events(self) -> list[tuple[str, str, int]]:
        out = [(e.kind, e.member.node, e.member.incarnation) for e in self.events]
        self.events.clear()
        return out


_HOSTS = {"me": 1, "a": 2, "b": 3, "c": 4, "d": 5, "new": 6, "ghost": 7}


def _member(name: str, incarnation: int = 0, host: int | None = None) -> Member:
    return Member(name, (f"127.0.0.{host or _HOSTS[name]}:7946",), incarnation=incarnation)


@pytest_asyncio.fixture
async def table() -> AsyncIterator[Table]:
    stream = EventStream()
    stats: Counter[str] = Counter()
    awareness = Awareness(8)
    sent: list[tuple[str, Message]] = []

    def send(address: str, message: bytes) -> None:
        sent.extend((address, m) for m in decode_body(pack_body([message]))[0])

    membership = Membership(_member("me"), _PROFILE, stream, awareness, stats, send)
    table = Table(membership, awareness, stats, sent)
    for name in ("a", "b", "c", "d"):
        membership.on_alive(_member(name))
    # From here on, record what is published.
    stream.publish = table.events.append  # type: ignore[method-assign]
    try:
        yield table
    finally:
        membership.close()


@pytest.mark.asyncio
async def test_news_needs_a_higher_incarnation(table: Table) -> None:
    table.membership.on_alive(_member("a", 0))
    table.membership.on_alive(Member("a", (_member("a").addresses[0],), frozenset({"p"}), (), 1))
    assert table.take_events() == [("update", "a", 1)]
    table.membership.on_alive(Member("a", (_member("a").addresses[0],), frozenset(), (), 1))
    assert table.take_events() == []  # same incarnation: not news
    table.membership.on_suspect(Suspect("a", 0, "b"))
    assert table.status("a") == (Status.ALIVE, 1)  # accusing an older version
    table.membership.on_suspect(Suspect("a", 1, "b"))
    assert table.status("a") == (Status.SUSPECT, 1)
    table.membership.on_alive(_member("a", 1))
    assert table.status("a") == (Status.SUSPECT, 1)  # refutation needs a higher one
    table.membership.on_alive(_member("a", 2))
    assert table.status("a") == (Status.ALIVE, 2)


@pytest.mark.asyncio
async def test_suspicion_runs_out_into_failed(table: Table) -> None:
    table.membership.on_suspect(Suspect("a", 0, "b"))
    table.membership.on_suspect(Suspect("a", 0, "c"))  # k = 2 confirmations:
    table.membership.on_suspect(Suspect("a", 0, "d"))  # down to the minimum
    assert table.status("a") == (Status.SUSPECT, 0)
    await asyncio.sleep(_PROFILE.suspicion_timeout(5) + 0.2)
    assert table.status("a") == (Status.FAILED, 0)
    assert table.take_events() == [("failed", "a", 0)]
    dead = [m for _, m in table.sent if isinstance(m, Dead)]
    assert dead == []  # a verdict is gossiped, not sent to anyone in particular
    assert len(table.membership.queue) >= 1


@pytest.mark.asyncio
async def test_our_own_accusation_goes_to_the_accused(table: Table) -> None:
    table.membership.on_suspect(Suspect("a", 0, "me"))
    assert table.sent == [(_member("a").addresses[0], Suspect("a", 0, "me"))]
    table.sent.clear()
    table.membership.on_suspect(Suspect("b", 0, "c"))  # someone else's: gossip only
    assert table.sent == []


@pytest.mark.asyncio
async def test_accusations_of_us_are_refuted_to_every_member_accuser_first(table: Table) -> None:
    table.membership.on_suspect(Suspect("me", 0, "c"))
    assert table.membership.local.incarnation == 1
    refutation = Alive(table.membership.local)
    assert table.sent[0] == (_member("c").addresses[0], refutation)
    peers = {state.address for state in table.membership.peers()}
    assert len(peers) >= 3
    assert sorted(table.sent, key=lambda sent: sent[0]) == [(a, refutation) for a in sorted(peers)]
    table.sent.clear()
    table.membership.on_suspect(Suspect("me", 0, "b"))  # stale now: nothing to refute
    assert table.sent == [] and table.stats["refuted"] == 1
    assert table.awareness.score == 1 and table.stats["refuted"] == 1
    table.membership.on_dead(Dead("me", 5, "b"))
    assert table.membership.local.incarnation == 6
    assert table.membership.local.status is Status.ALIVE
    table.membership.on_alive(Member("me", ("127.0.0.9:1",), incarnation=6))
    assert table.membership.local.incarnation == 7  # another version of us: out-bid it
    assert table.take_events() == []


@pytest.mark.asyncio
async def test_verdicts_of_cut_off_members_only_open_suspicions(table: Table) -> None:
    table.membership.on_dead(Dead("a", 0, "b"))  # b is alive to us: a verdict
    assert table.status("a") == (Status.FAILED, 0)
    table.membership.on_dead(Dead("c", 0, "a"))  # a is failed to us: a suspicion
    assert table.status("c") == (Status.SUSPECT, 0)
    assert (_member("c").addresses[0], Suspect("c", 0, "a")) in table.sent
    table.membership.on_dead(Dead("c", 0, "a"))  # again: still a suspicion
    assert table.status("c") == (Status.SUSPECT, 0)
    table.membership.on_alive(_member("a", 1))  # a is back ...
    table.membership.on_dead(Dead("d", 0, "a"))  # ... but its verdicts may be stale
    assert table.status("d") == (Status.SUSPECT, 0)
    table.membership.on_dead(Dead("b", 0, "b"))  # a goodbye is always final
    assert table.status("b") == (Status.LEFT, 0)
    assert table.stats["dead_as_suspect"] == 3


@pytest.mark.asyncio
async def test_merge_turns_verdicts_into_suspicions(table: Table) -> None:
    table.membership.merge(
        [
            _member("a").with_status(Status.FAILED),
            _member("b").with_status(Status.LEFT),
            _member("c", 3),
            _member("new").with_status(Status.SUSPECT),
            _member("ghost").with_status(Status.FAILED),
        ]
    )
    assert table.status("a") == (Status.SUSPECT, 0)
    assert table.status("b") == (Status.LEFT, 0)
    assert table.status("c") == (Status.ALIVE, 3)
    assert table.status("new") == (Status.SUSPECT, 0)
    assert table.membership.get("ghost") is None  # the dead are not learned
    assert table.take_events() == [("leave", "b", 0), ("join", "new", 0)]


@pytest.mark.asyncio
async def test_failed_member_returns_only_with_a_higher_incarnation(table: Table) -> None:
    table.membership.on_dead(Dead("a", 2, "b"))
    table.take_events()
    moved = _member("a", 2, host=99)
    table.membership.on_alive(moved)  # a restart that does not know its past
    assert table.status("a") == (Status.FAILED, 2)
    assert table.sent == [(moved.addresses[0], Dead("a", 2, "me"))]  # so tell it
    table.membership.on_alive(moved)
    assert len(table.sent) == 1  # at most one hint a probe interval
    table.membership.on_alive(_member("a", 3, host=99))  # it refuted: reclaim
    assert table.status("a") == (Status.ALIVE, 3)
    state = table.membership.get("a")
    assert state is not None and state.address == moved.addresses[0]
    assert table.membership.knows_address(moved.addresses[0])
    assert not table.membership.knows_address(_member("a").addresses[0])
    assert table.take_events() == [("join", "a", 3)]


@pytest.mark.asyncio
async def test_a_live_member_keeps_its_address(table: Table) -> None:
    table.membership.on_alive(_member("a", 5, host=99))
    assert table.status("a") == (Status.ALIVE, 0)
    assert table.stats["conflict"] == 1
    assert table.take_events() == []


@pytest.mark.asyncio
async def test_leaving_is_final_for_us(table: Table) -> None:
    goodbye = table.membership.leave()
    assert table.membership.local.status is Status.LEFT
    assert table.take_events() == [("leave", "me", 0)]
    table.membership.on_suspect(Suspect("me", 0, "a"))
    table.membership.on_alive(_member("me", 4))
    assert table.membership.local.status is Status.LEFT
    assert table.membership.local.incarnation == 0
    assert not goodbye.done()
    for _ in range(_PROFILE.retransmit_limit(5)):
        table.membership.queue.get(0, 1400)
    assert goodbye.done()


@pytest.mark.asyncio
async def test_accusing_a_member_already_gone_is_answered_with_the_verdict(table: Table) -> None:
    table.membership.on_dead(Dead("a", 0, "b"))
    table.membership.on_dead(Dead("d", 0, "d"))  # d left
    table.sent.clear()
    # c missed both verdicts and accuses alone: nobody is left to confirm
    # its suspicion, so tell it what we know.
    table.membership.on_suspect(Suspect("a", 0, "c"))
    table.membership.on_suspect(Suspect("d", 0, "c"))
    c = _member("c").addresses[0]
    assert table.sent == [(c, Dead("a", 0, "me")), (c, Dead("d", 0, "d"))]
    table.sent.clear()
    table.membership.on_suspect(Suspect("a", 1, "c"))  # a later incarnation than our verdict's
    table.membership.on_suspect(Suspect("a", 0, "ghost"))  # an accuser we do not know
    table.membership.on_suspect(Suspect("b", 0, "c"))  # alive to us: a suspicion, no verdict
    assert table.sent == []
    assert table.status("a") == (Status.FAILED, 0) and table.stats["verdicts_told"] == 2
