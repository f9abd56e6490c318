"""Views compared on every probe (``discovery/swim/sync.py``): a member that
gossip missed is mended by a push/pull within the settle time, not at the
next periodic push/pull."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest

from discovery.events import EventStream
from discovery.keys import Keyring
from discovery.member import Member
from discovery.profiles import PROFILES
from discovery.swim import SwimEngine
from discovery.swim.awareness import Awareness
from discovery.swim.messages import Message, MessageError, View, decode_body, encode, pack_body
from discovery.swim.state import Membership
from discovery.swim.sync import StateSync

_FAST = PROFILES["host"].with_changes(probe_interval=0.2, probe_timeout=0.05)


def test_digests_follow_who_is_live() -> None:
    async def main() -> None:
        one = Membership(
            Member("me", ("127.0.0.1:1",)), _FAST, EventStream(), Awareness(8), Counter(), _mute
        )
        other = Membership(
            Member("you", ("127.0.0.2:1",)), _FAST, EventStream(), Awareness(8), Counter(), _mute
        )
        assert one.view_digest() != other.view_digest()
        one.on_alive(Member("you", ("127.0.0.2:1",)))
        other.on_alive(Member("me", ("127.0.0.1:1",)))
        assert one.view_digest() == other.view_digest()  # same members, any order
        one.on_alive(Member("third", ("127.0.0.3:1",)))
        assert one.view_digest() != other.view_digest()
        assert len(one.view_digest()) == 8
        one.close()
        other.close()

    asyncio.run(main())


def test_view_messages_round_trip_and_bad_ones_are_refused() -> None:
    digest = os.urandom(8)
    assert decode_body(pack_body([encode(View(digest))])) == ([View(digest)], 0)
    for bad in (b"", os.urandom(7), os.urandom(9)):
        with pytest.raises(MessageError, match="VIEW"):
            decode_body(pack_body([b"\x92\x09" + _bin(bad)]))


@pytest.mark.asyncio
async def test_views_that_stay_different_are_mended_at_most_once_per_settle_time() -> None:
    stats: Counter[str] = Counter()
    membership = Membership(
        Member("me", ("127.0.0.1:1",)), _FAST, EventStream(), Awareness(8), stats, _mute
    )
    membership.on_alive(Member("you", ("127.0.0.2:1",)))
    asked: list[str] = []

    async def request(address: str, body: bytes, timeout: float) -> list[Message]:
        asked.append(address)
        return []

    tasks: list[asyncio.Task[object]] = []
    sync = StateSync(
        _FAST, membership, stats, request, lambda c: tasks.append(asyncio.ensure_future(c))
    )
    settle = _FAST.view_settle_time(membership.count())
    same, other = membership.view_digest(), os.urandom(8)

    sync.compare(same, "127.0.0.2:1")
    sync.compare(other, "127.0.0.2:1")  # first sight of a difference: gossip may be under way
    sync.compare(other, "127.0.0.2:1")
    await asyncio.sleep(settle / 2)
    sync.compare(same, "127.0.0.2:1")  # agreed again: the clock restarts
    await asyncio.sleep(settle / 2 + 0.02)
    sync.compare(other, "127.0.0.3:1")
    await asyncio.gather(*tasks)
    assert asked == [] and stats["view_mends"] == 0

    await asyncio.sleep(settle + 0.02)
    sync.compare(other, "127.0.0.3:1")  # different for a settle time: mend with this prober
    await asyncio.gather(*tasks)
    assert asked == ["127.0.0.3:1"] and stats["view_mends"] == 1

    sync.compare(other, "127.0.0.2:1")
    await asyncio.sleep(settle / 2)
    sync.compare(other, "127.0.0.2:1")  # within a settle time of the last mend: not yet
    await asyncio.gather(*tasks)
    assert asked == ["127.0.0.3:1"]
    await asyncio.sleep(settle)
    sync.compare(other, "127.0.0.2:1")
    await asyncio.gather(*tasks)
    assert asked == ["127.0.0.3:1", "127.0.0.2:1"] and stats["view_mends"] == 2
    assert stats["view_differs"] == 7
    membership.close()


@pytest.mark.asyncio
async def test_members_that_gossip_missed_converge_long_before_a_push_pull() -> None:
    """Gossip made lossy on purpose (each change sent once, to one member)
    and periodic push/pull out of reach: eight members that join one after
    the other still all know each other within a few settle times."""
    lossy = PROFILES["host"].with_changes(
        retransmit_mult=1,
        gossip_nodes=1,
        push_pull_interval=600.0,
        reconnect_interval=600.0,
    )
    net = f"127.{os.getpid() % 200 + 20}.{230}"
    key = Keyring.generate()
    names = [f"v{i}" for i in range(8)]
    engines = [
        SwimEngine(name, f"{net}.{i + 1}:0", profile=lossy, keyring=key)
        for i, name in enumerate(names)
    ]
    try:
        for engine in engines:
            await engine.start()
        seed = engines[0].local().addresses[0]
        for engine in engines[1:]:
            assert await engine.join([seed]) == 1
        loop = asyncio.get_running_loop()
        joined = loop.time()
        bound = 4 * lossy.view_settle_time(len(names)) + 4 * lossy.probe_interval
        while not all({m.node for m in e.members() if m.alive} == set(names) for e in engines):
            assert loop.time() - joined < bound + 5, [
                sorted(m.node for m in e.members() if m.alive) for e in engines
            ]
            await asyncio.sleep(0.02)
        took = loop.time() - joined
        mends = sum(e.stats().get("view_mends", 0) for e in engines)
        print(f"converged {took:.2f} s after the last join, {mends} view mends")
        assert mends >= 1  # gossip alone did not do it
        assert took < bound
    finally:
        for engine in engines:
            await engine.stop()


def _mute(address: str, message: bytes) -> None:
    pass


def _bin(data: bytes) -> bytes:
    return b"\xc4" + bytes([len(data)]) + data
