"""The pure parts of the SWIM engine: suspicion timing, health awareness,
the broadcast queue, profiles, keyrings, and the prober's Lifeguard rules
(with a fake network)."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import stat
import time
from collections import Counter
from pathlib import Path

import pytest

from discovery.events import EventStream
from discovery.keys import Keyring
from discovery.member import Member, Status
from discovery.profiles import PROFILES, Profile, get_profile
from discovery.swim.awareness import Awareness
from discovery.swim.broadcast import BroadcastQueue
from discovery.swim.messages import (
    IndirectPing,
    Message,
    Nack,
    Ping,
    Suspect,
    decode_body,
    pack_body,
)
from discovery.swim.probe import Prober
from discovery.swim.state import Membership
from discovery.swim.suspicion import Suspicion, remaining_suspicion_time

# -- suspicion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    [  # memberlist suspicion_test.go, min 2 s, max 30 s
        (0, 3, 0.0, 30.0),
        (1, 3, 2.0, 14.0),
        (2, 3, 3.0, 4.81),
        (3, 3, 4.0, -2.0),
        (4, 3, 5.0, -3.0),
        (5, 3, 10.0, -8.0),
    ],
)
def test_remaining_suspicion_time(n: int, k: int, elapsed: float, expected: float) -> None:
    assert remaining_suspicion_time(n, k, elapsed, 2.0, 30.0) == pytest.approx(expected, abs=1e-9)


def test_remaining_suspicion_time_without_confirmations_wanted() -> None:
    assert remaining_suspicion_time(0, 0, 0.5, 2.0, 30.0) == pytest.approx(1.5)


async def _fire_time(k: int, confirm: list[tuple[str, bool]], lo: float, hi: float) -> float:
    loop = asyncio.get_running_loop()
    fired: asyncio.Future[int] = loop.create_future()
    suspicion = Suspicion("me", k, lo, hi, fired.set_result, loop)
    for source, new in confirm:
        assert suspicion.confirm(source) is new, source
    confirmations = await asyncio.wait_for(fired, hi + 2)
    assert confirmations == sum(new for _, new in confirm)
    return loop.time() - suspicion.start


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("confirm", "expected"),
    [  # memberlist's TestSuspicion_Timer cases, scaled by 1/10 (k=3, 50 ms .. 200 ms)
        ([], 0.200),
        ([("me", False), ("foo", True)], 0.125),
        ([("me", False), ("foo", True), ("foo", False), ("foo", False)], 0.125),
        ([("me", False), ("foo", True), ("bar", True)], 0.081),
        ([("me", False), ("foo", True), ("bar", True), ("baz", True)], 0.050),
        ([("foo", True), ("bar", True), ("baz", True), ("zoo", False)], 0.050),
    ],
)
async def test_suspicion_timer_shrinks_with_confirmations(
    confirm: list[tuple[str, bool]], expected: float
) -> None:
    took = await _fire_time(3, confirm, 0.05, 0.2)
    assert expected - 0.005 <= took <= expected + 0.15  # never early; late under load


@pytest.mark.asyncio
async def test_suspicion_confirmed_after_its_minimum_fires_at_once() -> None:
    loop = asyncio.get_running_loop()
    fired: asyncio.Future[int] = loop.create_future()
    suspicion = Suspicion("me", 1, 0.05, 0.5, fired.set_result, loop)
    await asyncio.sleep(0.1)
    assert not fired.done()
    before = loop.time()
    assert suspicion.confirm("other")
    assert await asyncio.wait_for(fired, 1) == 1
    assert loop.time() - before < 0.1


@pytest.mark.asyncio
async def test_suspicion_cancelled_never_fires() -> None:
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    suspicion = Suspicion("me", 0, 0.02, 0.02, fired.append, loop)
    suspicion.cancel()
    await asyncio.sleep(0.08)
    assert fired == [] and not suspicion.active
    assert not suspicion.confirm("other")


# -- awareness ---------------------------------------------------------------------


def test_awareness_is_bounded_and_scales() -> None:
    awareness = Awareness(8)
    assert awareness.scale(0.2) == pytest.approx(0.2)
    awareness.apply(-3)
    assert awareness.score == 0
    awareness.apply(3)
    assert awareness.scale(0.2) == pytest.approx(0.8)
    awareness.apply(100)
    assert awareness.score == 7
    assert awareness.scale(1.0) == pytest.approx(8.0)
    awareness.apply(-1)
    assert awareness.score == 6
    with pytest.raises(ValueError):
        Awareness(0)


# -- broadcast queue ---------------------------------------------------------------


def test_broadcast_queue_replaces_older_news_about_a_member() -> None:
    queue = BroadcastQueue(lambda: 3)
    loop = asyncio.new_event_loop()
    try:
        replaced: asyncio.Future[None] = loop.create_future()
        queue.queue("a", b"old", replaced)
        queue.queue("a", b"new")
        assert replaced.done()
    finally:
        loop.close()
    assert len(queue) == 1
    assert queue.get(0, 100) == [b"new"]


def test_broadcast_queue_order_limit_and_retirement() -> None:
    queue = BroadcastQueue(lambda: 2)
    queue.queue("a", b"a" * 10)
    queue.queue("b", b"b" * 10)
    queue.queue("c", b"c" * 30)
    # Fewest sends first, the largest of those first, then newest first.
    assert queue.get(0, 1000) == [b"c" * 30, b"b" * 10, b"a" * 10]
    queue.queue("d", b"d" * 10)
    assert queue.get(0, 25) == [b"d" * 10, b"b" * 10]  # d never sent; 25 bytes hold two
    assert len(queue) == 3  # b retired after its second send
    assert queue.get(2, 1000) == [b"c" * 30, b"d" * 10, b"a" * 10]
    assert len(queue) == 0
    assert queue.get(0, 1000) == []


def test_broadcast_queue_respects_overhead_and_item_cap() -> None:
    queue = BroadcastQueue(lambda: 5)
    for i in range(10):
        queue.queue(f"n{i}", bytes([i]) * 8)
    assert len(queue.get(2, 50)) == 5  # 5 * (8 + 2) = 50
    assert len(queue.get(0, 1000, max_items=3)) == 3
    assert queue.get(0, 7) == []


def test_broadcast_queue_done_resolves_on_retirement_and_drop() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = BroadcastQueue(lambda: 1)
        sent: asyncio.Future[None] = loop.create_future()
        big: asyncio.Future[None] = loop.create_future()
        queue.queue("a", b"x", sent)
        queue.queue("b", b"y" * 2000, big)
        assert queue.get(0, 100) == [b"x"]
        assert sent.done() and not big.done()
        assert queue.drop_larger_than(1400) == 1
        assert big.done() and len(queue) == 0
    finally:
        loop.close()


# -- profiles ----------------------------------------------------------------------


def test_profiles_carry_memberlists_values() -> None:
    # memberlist config.go at 1b4c746: DefaultLANConfig, DefaultWANConfig,
    # DefaultLocalConfig.
    lan, wan, local = PROFILES["lan"], PROFILES["wan"], PROFILES["local"]
    assert (lan.probe_interval, lan.probe_timeout, lan.indirect_checks) == (1.0, 0.5, 3)
    assert (lan.retransmit_mult, lan.suspicion_mult, lan.suspicion_max_timeout_mult) == (4, 4, 6)
    assert (lan.gossip_interval, lan.gossip_nodes, lan.push_pull_interval) == (0.2, 3, 30.0)
    assert (lan.tcp_timeout, lan.awareness_max_multiplier, lan.gossip_to_the_dead_time) == (
        10.0,
        8,
        30.0,
    )
    assert (wan.probe_interval, wan.probe_timeout, wan.suspicion_mult) == (5.0, 3.0, 6)
    assert (wan.gossip_nodes, wan.gossip_interval, wan.push_pull_interval) == (4, 0.5, 60.0)
    assert (wan.tcp_timeout, wan.gossip_to_the_dead_time) == (30.0, 60.0)
    assert (local.probe_interval, local.probe_timeout, local.indirect_checks) == (1.0, 0.2, 1)
    assert (local.retransmit_mult, local.suspicion_mult, local.gossip_interval) == (2, 3, 0.1)
    assert (local.push_pull_interval, local.tcp_timeout, local.gossip_to_the_dead_time) == (
        15.0,
        1.0,
        15.0,
    )
    assert set(PROFILES) == {"host", "local", "lan", "wan"}


def test_profile_formulas() -> None:
    lan = PROFILES["lan"]
    # suspicionTimeout(4, 16, 1s) = 4 * 1.204 s; the max is 6 times that.
    assert lan.suspicion_timeout(16) == pytest.approx(4 * 1.204)
    assert lan.suspicion_timeout(1) == pytest.approx(4.0)
    assert lan.suspicion_max_timeout(16) == pytest.approx(6 * 4 * 1.204)
    assert lan.retransmit_limit(16) == 4 * math.ceil(math.log10(17))
    assert lan.retransmit_limit(1) == 4
    assert lan.suspicion_confirmations(16) == 2
    assert lan.suspicion_confirmations(3) == 0  # only one other could confirm
    assert lan.push_pull_period(32) == 30.0
    assert lan.push_pull_period(64) == 60.0
    assert lan.push_pull_period(100) == 90.0


def test_failure_detection_bounds() -> None:
    host, local = PROFILES["host"], PROFILES["local"]
    assert host.failure_detection_bound(16) <= 2.5  # "about 2 s at 16 members"
    for profile in PROFILES.values():
        bound = profile.failure_detection_bound(16)
        # Never below what the mechanism needs: a probe plus the shortest suspicion.
        assert bound > profile.probe_interval + profile.suspicion_timeout(16)
        assert profile.failure_detection_bound(1000) > bound
    assert local.failure_detection_bound(16) > host.failure_detection_bound(16)


def test_profile_validation_and_lookup() -> None:
    host = PROFILES["host"]
    assert get_profile("host") is host and get_profile(host) is host
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("moon")
    with pytest.raises(ValueError, match="probe_timeout"):
        host.with_changes(probe_timeout=1.0)
    with pytest.raises(ValueError, match="gossip_nodes"):
        host.with_changes(gossip_nodes=0)
    assert isinstance(host.with_changes(suspicion_mult=8), Profile)


# -- keyring -----------------------------------------------------------------------


def test_keyring_file_round_trip(tmp_path: Path) -> None:
    ring = Keyring([os.urandom(32), os.urandom(16), os.urandom(24)])
    path = tmp_path / "keys"
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path) == ring
    text = "# cluster keys\n\n" + ring.dumps().replace("\n", "  # a comment\n", 1)
    path.write_text(text)
    loaded = Keyring.load(path)
    assert loaded.primary == ring.primary and loaded.keys == ring.keys
    assert base64.b64encode(ring.primary).decode() not in repr(ring)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no keys"),
        ("# nothing\n\n", "holds no keys"),
        ("not base64!\n", r"keys:1: not a base64 key"),
        (base64.b64encode(b"k" * 32).decode() + "\n" + "QUJD\n", r"keys:2: key is 3 bytes"),
        (base64.b64encode(b"k" * 20).decode(), "key is 20 bytes; AES keys are 16, 24 or 32"),
    ],
)
def test_keyring_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        Keyring.load(path)


def test_keyring_rotation_steps() -> None:
    old, new = os.urandom(32), os.urandom(32)
    ring = Keyring([old])
    ring = ring.with_key(new)
    assert ring.primary == old and ring.keys == (old, new)
    ring = ring.with_primary(new)
    assert ring.keys == (new, old)
    with pytest.raises(ValueError, match="primary"):
        ring.without_key(new)
    ring = ring.without_key(old)
    assert ring.keys == (new,)
    with pytest.raises(KeyError):
        ring.with_primary(old)
    with pytest.raises(KeyError):
        ring.without_key(old)
    with pytest.raises(ValueError, match="at least one key"):
        Keyring([])
    assert len(Keyring.generate().primary) == 32
    assert len(Keyring.generate(16).primary) == 16


# -- the prober's Lifeguard rules, over a fake network ---------------------------------

_FAST = PROFILES["host"].with_changes(probe_interval=0.2, probe_timeout=0.05)


class _FakeNet:
    """Records what the prober sends; relays may NACK; the target never answers."""

    def __init__(self, nacking: set[str], stall_after_ping: float = 0.0) -> None:
        self.nacking = nacking
        self.stall_after_ping = stall_after_ping
        self.sent: list[tuple[str, Message]] = []
        self.prober: Prober | None = None

    def send(self, address: str, encoded: list[bytes]) -> None:
        for message in decode_body(pack_body(encoded))[0]:
            self.sent.append((address, message))
            loop = asyncio.get_running_loop()
            if isinstance(message, IndirectPing) and address in self.nacking:
                assert self.prober is not None
                loop.call_later(_FAST.probe_timeout, self.prober.on_nack, message.seq)
            if isinstance(message, Ping) and self.stall_after_ping:
                time.sleep(self.stall_after_ping)  # our loop stalls with the probe in flight

    async def request(self, address: str, body: bytes, timeout: float) -> list[Message]:
        raise ConnectionRefusedError(address)


async def _probe_silent_target(
    net: _FakeNet, relays: int
) -> tuple[bool, Membership, Awareness, Counter[str]]:
    stats: Counter[str] = Counter()
    awareness = Awareness(8)
    local = Member("me", ("127.0.0.1:1",))
    membership = Membership(local, _FAST, EventStream(), awareness, stats, lambda a, m: None)
    membership.on_alive(Member("target", ("127.0.0.2:1",)))
    for i in range(relays):
        membership.on_alive(Member(f"relay{i}", (f"127.0.0.{10 + i}:1",)))
    prober = Prober(
        "me", _FAST, membership, awareness, stats, net.send, net.request, membership.view_digest
    )
    net.prober = prober
    target = membership.get("target")
    assert target is not None
    answered = await prober.probe(target)
    membership.close()
    return answered, membership, awareness, stats


@pytest.mark.asyncio
async def test_silent_target_is_suspected_and_nacks_spare_our_health() -> None:
    net = _FakeNet(nacking={"127.0.0.10:1", "127.0.0.11:1"})
    answered, membership, awareness, _ = await _probe_silent_target(net, relays=2)
    assert not answered
    target = membership.get("target")
    assert target is not None and target.status is Status.SUSPECT
    assert awareness.score == 0  # both helpers said NACK: the problem is the target
    assert sum(isinstance(m, IndirectPing) for _, m in net.sent) == 2


@pytest.mark.asyncio
async def test_missing_nacks_count_against_our_health() -> None:
    net = _FakeNet(nacking={"127.0.0.10:1"})
    answered, membership, awareness, _ = await _probe_silent_target(net, relays=3)
    assert not answered
    assert awareness.score == 2  # two of three helpers were not heard from
    target = membership.get("target")
    assert target is not None and target.status is Status.SUSPECT


@pytest.mark.asyncio
async def test_stalled_prober_accuses_no_one() -> None:
    net = _FakeNet(nacking=set(), stall_after_ping=0.4)
    answered, membership, awareness, stats = await _probe_silent_target(net, relays=2)
    assert not answered
    target = membership.get("target")
    assert target is not None and target.status is Status.ALIVE
    assert stats["probe_overslept"] == 1 and stats["suspected"] == 0
    assert awareness.score == 1


@pytest.mark.asyncio
async def test_suspected_target_hears_the_accusation_with_the_ping() -> None:
    net = _FakeNet(nacking=set())
    stats: Counter[str] = Counter()
    awareness = Awareness(8)
    membership = Membership(
        Member("me", ("127.0.0.1:1",)), _FAST, EventStream(), awareness, stats, lambda a, m: None
    )
    membership.on_alive(Member("target", ("127.0.0.2:1",), incarnation=4))
    membership.on_suspect(Suspect("target", 4, "someone"))
    prober = Prober(
        "me", _FAST, membership, awareness, stats, net.send, net.request, membership.view_digest
    )
    net.prober = prober
    target = membership.get("target")
    assert target is not None
    await prober.probe(target)
    first_packet = [m for a, m in net.sent if a == "127.0.0.2:1"]
    assert isinstance(first_packet[0], Ping)
    assert first_packet[1] == Suspect("target", 4, "me")  # the buddy system
    assert not any(isinstance(m, Nack) for _, m in net.sent)
    membership.close()


@pytest.mark.asyncio
async def test_slots_make_every_member_probed_once_by_a_different_member() -> None:
    names = [f"node-{i:02d}" for i in range(7)]
    probers = []
    for me in names:
        membership = Membership(
            Member(me, ("127.0.0.1:1",)),
            _FAST,
            EventStream(),
            Awareness(8),
            Counter(),
            lambda a, m: None,
        )
        for i, other in enumerate(names):
            if other != me:
                membership.on_alive(Member(other, (f"127.0.0.{i + 2}:1",)))
        probers.append(
            (
                me,
                Prober(
                    me,
                    _FAST,
                    membership,
                    Awareness(8),
                    Counter(),
                    lambda a, m: None,
                    _no_tcp,
                    membership.view_digest,
                ),
            )
        )
    previous: dict[str, str] = {}
    for slot in range(1000, 1000 + 3 * len(names)):
        assignment = {}
        for me, prober in probers:
            target = prober.target_for_slot(slot)
            assert target is not None and target.member.node != me
            assignment[target.member.node] = me
        assert set(assignment) == set(names)  # everyone probed, exactly once
        assert all(previous.get(t) != p for t, p in assignment.items())  # by someone new
        previous = assignment


async def _no_tcp(address: str, body: bytes, timeout: float) -> list[Message]:
    raise ConnectionRefusedError(address)
