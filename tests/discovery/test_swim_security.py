"""Live engines (in this process, over loopback) against the wrong key,
garbage, truncated, tampered and oversized packets: all dropped and
counted, and the engines keep working."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.engine import EngineError
from discovery.keys import Keyring
from discovery.member import Status, split_host
from discovery.swim import SwimEngine
from discovery.swim.messages import Ack, IndirectPing, Nack, Ping, decode_body, encode, pack_body
from discovery.swim.packet import MAX_PACKET, Sealer

T = TypeVar("T")

_KEY = Keyring([os.urandom(32)])
_OTHER = Keyring([os.urandom(32)])


class LoopThread:
    """An event loop in a thread, so sync (hypothesis) tests can drive engines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        done: Future[T] = Future()

        def invoke() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return done.result(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Pair:
    """Two keyed engines on loopback that know each other."""

    def __init__(self, lt: LoopThread) -> None:
        self.lt = lt
        net = f"127.{os.getpid() % 200 + 20}.{int(time.time() * 1000) % 250}"
        self.a = SwimEngine("sec-a", f"{net}.1:0", profile="host", keyring=_KEY)
        self.b = SwimEngine("sec-b", f"{net}.2:0", profile="host", keyring=_KEY)
        self.net = net
        lt.run(self.a.start())
        lt.run(self.b.start())
        assert lt.run(self.b.join([self.address])) == 1

    @property
    def address(self) -> str:
        return self.lt.call(lambda: self.a.local().addresses[0])

    def stats(self) -> dict[str, int]:
        return self.lt.call(self.a.stats)

    def drops(self) -> int:
        return sum(v for k, v in self.stats().items() if k.startswith("drop_"))

    def wait_drops(self, at_least: int, timeout: float = 5) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while self.drops() < at_least:
            assert time.monotonic() < deadline, f"drops stuck at {self.drops()} < {at_least}"
            time.sleep(0.002)
        return self.stats()

    def still_working(self) -> None:
        assert self.lt.run(self.a.probe("sec-b")) is True
        members = {m.node: m.status for m in self.lt.call(self.a.members)}
        assert members == {"sec-a": Status.ALIVE, "sec-b": Status.ALIVE}

    def close(self) -> None:
        self.lt.run(self.a.stop())
        self.lt.run(self.b.stop())


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    lt = LoopThread()
    pair = None
    try:
        pair = Pair(lt)
        yield pair
    finally:
        if pair is not None:
            pair.close()
        lt.close()


@pytest.fixture(scope="module")
def udp() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        yield sock


def _send(sock: socket.socket, address: str, data: bytes) -> None:
    ip, port = split_host(address)
    sock.sendto(data, (ip, port))


def test_pair_works(pair: Pair) -> None:
    pair.still_working()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.binary(min_size=0, max_size=1400))
def test_garbage_is_dropped_and_counted(pair: Pair, udp: socket.socket, data: bytes) -> None:
    before = pair.drops()
    _send(udp, pair.address, data)
    pair.wait_drops(before + 1)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.integers(0, 10_000), st.booleans())
def test_truncated_and_tampered_packets_are_dropped(
    pair: Pair, udp: socket.socket, cut: int, tamper: bool
) -> None:
    packet = bytearray(Sealer(_KEY).seal(pack_body([encode(Ping(1, "sec-a", "intruder"))])))
    if tamper:
        packet[cut % len(packet)] ^= 0x5A
    else:
        del packet[cut % len(packet) :]
    before = pair.drops()
    _send(udp, pair.address, bytes(packet))
    stats = pair.wait_drops(before + 1)
    assert stats.get("drop_truncated", 0) + stats.get("drop_auth", 0) > 0


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.integers(MAX_PACKET + 1, 60_000))
def test_oversized_packets_are_dropped(pair: Pair, udp: socket.socket, size: int) -> None:
    before = pair.stats().get("drop_oversize", 0)
    _send(udp, pair.address, Sealer(_KEY).seal(os.urandom(size)))
    deadline = time.monotonic() + 5
    while pair.stats().get("drop_oversize", 0) <= before:
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_wrong_key_packets_are_unauthenticated(pair: Pair, udp: socket.socket) -> None:
    before = pair.stats().get("drop_auth", 0)
    ping = pack_body([encode(Ping(1, "sec-a", "intruder"))])
    for sealer in (Sealer(_OTHER), Sealer(None)):
        _send(udp, pair.address, sealer.seal(ping))
    udp.settimeout(0.3)
    deadline = time.monotonic() + 5
    while pair.stats().get("drop_auth", 0) < before + 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(TimeoutError):
        udp.recvfrom(2048)  # and nothing answered


def test_a_right_key_ping_is_answered(pair: Pair) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((f"{pair.net}.9", 0))
        sock.settimeout(3)
        sealer = Sealer(_KEY)
        _send(sock, pair.address, sealer.seal(pack_body([encode(Ping(42, "sec-a", "probe"))])))
        messages, _ = decode_body(sealer.open(sock.recvfrom(2048)[0]))
        assert messages[0] == Ack(42)
        before = pair.stats().get("drop_misdirected", 0)
        _send(sock, pair.address, sealer.seal(pack_body([encode(Ping(43, "not-a", "probe"))])))
        with pytest.raises(TimeoutError):
            sock.settimeout(0.3)
            sock.recvfrom(2048)
        assert pair.stats().get("drop_misdirected", 0) == before + 1


def test_unknown_kinds_are_counted(pair: Pair, udp: socket.socket) -> None:
    before = pair.stats().get("drop_unknown", 0)
    body = msgpack.packb([[250, "from a newer version"], [3, 77]], use_bin_type=True)
    _send(udp, pair.address, Sealer(_KEY).seal(body))
    deadline = time.monotonic() + 5
    while pair.stats().get("drop_unknown", 0) <= before:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _frame(packet: bytes) -> bytes:
    return struct.pack("!I", len(packet)) + packet


def test_bad_tcp_frames_are_dropped(pair: Pair) -> None:
    ip, port = split_host(pair.address)
    cases = [
        (struct.pack("!I", 1 << 30), "drop_oversize"),  # announces a huge frame
        (struct.pack("!I", 100) + b"short", "drop_truncated"),  # and hangs up
        (struct.pack("!I", 40) + os.urandom(40), "drop_malformed"),
        (_frame(Sealer(_OTHER).seal(os.urandom(12))), "drop_auth"),
    ]
    for frame, counter in cases:
        before = pair.stats().get(counter, 0)
        with socket.create_connection((ip, port), timeout=3) as conn:
            conn.sendall(frame)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b""  # no answer, just closed
        deadline = time.monotonic() + 5
        while pair.stats().get(counter, 0) <= before:
            assert time.monotonic() < deadline, counter
            time.sleep(0.005)


def test_engines_keep_working_after_the_junk(pair: Pair) -> None:
    pair.still_working()
    assert pair.drops() > 200


# -- keys between engines ---------------------------------------------------------


async def _can_join(first: Keyring | None, second: Keyring | None, net: str) -> bool:
    a = SwimEngine("k-a", f"{net}.1:0", profile="host", keyring=first)
    b = SwimEngine("k-b", f"{net}.2:0", profile="host", keyring=second)
    await a.start()
    await b.start()
    try:
        await b.join([a.local().addresses[0]])
    except EngineError:
        assert a.stats().get("drop_auth", 0) >= 1
        return False
    finally:
        await a.stop()
        await b.stop()
    return True


@pytest.mark.asyncio
async def test_keys_decide_who_can_join() -> None:
    old, new = os.urandom(32), os.urandom(16)
    net = f"127.{os.getpid() % 200 + 20}.251"
    assert await _can_join(Keyring([old]), Keyring([old]), net)
    assert await _can_join(None, None, net)  # plain, still framed and checked
    # Mid-rotation: the new key installed everywhere, primary on some.
    assert await _can_join(Keyring([old, new]), Keyring([new, old]), net)
    assert not await _can_join(Keyring([old]), Keyring([new]), net)
    assert not await _can_join(Keyring([old]), None, net)
    assert not await _can_join(None, Keyring([old]), net)


@pytest.mark.asyncio
async def test_engine_configuration_errors() -> None:
    with pytest.raises(EngineError, match="ip:port"):
        SwimEngine("x", "localhost")
    with pytest.raises(EngineError, match="advertise"):
        SwimEngine("x", "0.0.0.0:0")
    with pytest.raises(EngineError, match="node name"):
        SwimEngine("", "127.0.0.1:0")
    with pytest.raises(ValueError, match="unknown profile"):
        SwimEngine("x", "127.0.0.1:0", profile="moon")
    engine = SwimEngine("x", "127.0.0.1:0", profile="host")
    with pytest.raises(EngineError, match="not started"):
        await engine.join(["127.0.0.1:1"])
    await engine.start()
    try:
        with pytest.raises(EngineError, match="no member answered"):
            await engine.join([])
        huge = frozenset(f"{i:02d}" + "p" * 200 for i in range(8))
        with pytest.raises(EngineError, match="a packet holds 1400"):
            await engine.update_local(pools=huge)
        updated = await engine.update_local(pools=frozenset({"pool-1"}))
        assert updated.incarnation == 1 and engine.local() == updated
    finally:
        await engine.stop()
        await engine.stop()  # idempotent


@pytest.mark.asyncio
async def test_keys_rotate_on_running_engines() -> None:
    old, new = os.urandom(32), os.urandom(32)
    net = f"127.{os.getpid() % 200 + 20}.252"
    a = SwimEngine("r-a", f"{net}.1:0", profile="host", keyring=Keyring([old]))
    b = SwimEngine("r-b", f"{net}.2:0", profile="host", keyring=Keyring([old]))
    plain = SwimEngine("r-p", f"{net}.3:0", profile="host")
    for engine in (a, b, plain):
        await engine.start()
    try:
        await b.join([a.local().addresses[0]])
        steps = [
            (Keyring([old, new]), Keyring([old, new])),  # 1. install the new key
            (Keyring([new, old]), Keyring([old, new])),  # 2. primary on some ...
            (Keyring([new, old]), Keyring([new, old])),  # ... then on all
            (Keyring([new]), Keyring([new])),  # 3. retire the old key
        ]
        for ring_a, ring_b in steps:
            await a.set_keyring(ring_a)
            await b.set_keyring(ring_b)
            assert await a.probe("r-b") and await b.probe("r-a")
        auth_drops = a.stats().get("drop_auth", 0)
        await b.set_keyring(Keyring([old]))  # one member left behind
        assert not await a.probe("r-b")
        assert a.stats().get("drop_auth", 0) > auth_drops
        with pytest.raises(EngineError, match="not sealed"):
            await plain.set_keyring(Keyring([new]))
    finally:
        for engine in (a, b, plain):
            await engine.stop()


@pytest.mark.asyncio
async def test_strangers_get_no_gossip_and_no_relaying() -> None:
    net = f"127.{os.getpid() % 200 + 20}.253"
    engine = SwimEngine("s-a", f"{net}.1:0", profile="host")
    await engine.start()
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Stranger(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            replies.put_nowait(data)

    stranger, _ = await loop.create_datagram_endpoint(Stranger, local_addr=(f"{net}.9", 0))
    try:
        await engine.update_local(pools=frozenset({"p"}))  # queued gossip, nobody to take it
        assert engine.stats()["broadcast_queue"] == 1
        plain = Sealer(None)
        ip, port = split_host(engine.local().addresses[0])
        stranger.sendto(plain.seal(pack_body([encode(Ping(7, "s-a", "x"))])), (ip, port))
        messages, _ = decode_body(plain.open(await asyncio.wait_for(replies.get(), 3)))
        assert messages == [Ack(7)]  # the ack alone, no piggy-backed gossip
        # Nor does it ping where a stranger says on its behalf.
        victim = f"{net}.10:9"
        for target in ("s-a", "nobody"):
            ask = IndirectPing(8, target, victim, "x", True)
            stranger.sendto(plain.seal(pack_body([encode(ask)])), (ip, port))
            messages, _ = decode_body(plain.open(await asyncio.wait_for(replies.get(), 3)))
            assert messages == [Nack(8)]
        assert engine.stats()["relay_refused"] == 2 and engine.stats().get("relayed", 0) == 0
    finally:
        stranger.close()
        await engine.stop()
