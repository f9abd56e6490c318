"""SwimEngine in this process, a few members over loopback: reclaiming a
dead member's name from a new address, leaving, and the events of each."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from discovery.events import Event, Subscription
from discovery.keys import Keyring
from discovery.member import Member, Status
from discovery.swim import SwimEngine
from discovery.swim.messages import Ack, Ping, PushPull, decode_body, encode, pack_body
from discovery.swim.packet import FRAME_HEADER, Sealer

_KEY = Keyring.generate()


def _net(offset: int) -> str:
    return f"127.{os.getpid() % 200 + 20}.{240 + offset}"


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _event(subscription: Subscription, kind: str, node: str, timeout: float) -> Event:
    async def find() -> Event:
        while True:
            event = await subscription.get()
            if event.kind == kind and event.member.node == node:
                return event

    return await asyncio.wait_for(find(), timeout)


@pytest_asyncio.fixture
async def trio() -> AsyncIterator[list[SwimEngine]]:
    net = _net(0)
    engines = [
        SwimEngine(name, f"{net}.{i + 1}:0", profile="host", keyring=_KEY)
        for i, name in enumerate(("a", "b", "c"))
    ]
    for engine in engines:
        await engine.start()
    seed = engines[0].local().addresses[0]
    for engine in engines[1:]:
        assert await engine.join([seed]) == 1
    await _until(
        lambda: all(len([m for m in e.members() if m.alive]) == 3 for e in engines), 5, "3 alive"
    )
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.stop()


def _status(engine: SwimEngine, node: str) -> tuple[Status, int, str] | None:
    for member in engine.members():
        if member.node == node:
            return member.status, member.incarnation, member.addresses[0]
    return None


@pytest.mark.asyncio
async def test_failed_member_comes_back_at_a_new_address(trio: list[SwimEngine]) -> None:
    a, b, c = trio
    watch = a.subscribe()
    old_address = c.local().addresses[0]
    await c.stop()  # a crash: no goodbye
    failed = await _event(watch, "failed", "c", timeout=10)
    reborn = SwimEngine("c", f"{_net(0)}.4:0", profile="host", keyring=_KEY)
    await reborn.start()
    try:
        await reborn.join([a.local().addresses[0]])
        joined = await _event(watch, "join", "c", timeout=5)
        assert joined.member.addresses[0] == reborn.local().addresses[0] != old_address
        assert joined.member.incarnation > failed.member.incarnation
        assert reborn.local().incarnation == joined.member.incarnation  # it refuted
        await _until(lambda: (_status(b, "c") or (None,))[0] is Status.ALIVE, 5, "b sees c")
        assert _status(b, "c") == (
            Status.ALIVE,
            joined.member.incarnation,
            joined.member.addresses[0],
        )
    finally:
        await reborn.stop()


@pytest.mark.asyncio
async def test_restart_at_a_new_address_before_the_failure_is_noticed(
    trio: list[SwimEngine],
) -> None:
    a, b, c = trio
    watch = a.subscribe()
    old_address = c.local().addresses[0]
    await c.stop()
    reborn = SwimEngine("c", f"{_net(0)}.5:0", profile="host", keyring=_KEY)
    await reborn.start()
    try:
        await reborn.join([a.local().addresses[0], b.local().addresses[0]])
        # The old record is alive at the old address: the new one conflicts
        # until the old one is failed, then takes the name over.
        assert _address(a, "c") == old_address
        assert a.stats().get("conflict", 0) >= 1
        failed = await _event(watch, "failed", "c", timeout=10)
        assert failed.member.addresses[0] == old_address
        joined = await _event(watch, "join", "c", timeout=10)
        assert joined.member.addresses[0] == reborn.local().addresses[0]
        assert joined.member.incarnation > failed.member.incarnation
    finally:
        await reborn.stop()


@pytest.mark.asyncio
async def test_leave_is_announced_and_final(trio: list[SwimEngine]) -> None:
    a, b, c = trio
    watch_a, watch_c = a.subscribe(), c.subscribe()
    await c.leave()
    assert c.local().status is Status.LEFT
    assert (await _event(watch_c, "leave", "c", timeout=1)).member.status is Status.LEFT
    left = await _event(watch_a, "leave", "c", timeout=2)
    assert left.member.incarnation == c.local().incarnation
    await _until(lambda: (_status(b, "c") or (None,))[0] is Status.LEFT, 2, "b sees c leave")
    await c.leave()  # idempotent
    await c.stop()
    await asyncio.sleep(3 * a.profile.probe_interval)
    assert _status(a, "c") == (Status.LEFT, left.member.incarnation, left.member.addresses[0])
    assert not [e for e in _drain(watch_a) if e.kind == "failed"]


def _address(engine: SwimEngine, node: str) -> str | None:
    status = _status(engine, node)
    return None if status is None else status[2]


def _drain(subscription: Subscription) -> list[Event]:
    events = []
    while (event := subscription.get_nowait()) is not None:
        events.append(event)
    return events


@pytest.mark.asyncio
async def test_tcp_fallback_probe_reaches_a_member_whose_udp_is_lost() -> None:
    """A peer whose UDP is black-holed but whose TCP answers: the probe's
    TCP fallback finds it alive, and nobody is accused."""
    net = _net(0)
    sealer = Sealer(_KEY)
    tcp_pings = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tcp_pings
        (length,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
        messages, _ = decode_body(sealer.open(await reader.readexactly(length), 1 << 20))
        reply: bytes | None = None
        for message in messages:
            if isinstance(message, PushPull):
                reply = pack_body([encode(PushPull(False, (record,)))])
            elif isinstance(message, Ping) and message.target == "ghost":
                tcp_pings += 1
                reply = pack_body([encode(Ack(message.seq))])
        if reply is not None:
            packet = sealer.seal(reply)
            writer.write(FRAME_HEADER.pack(len(packet)) + packet)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, f"{net}.7", 0)
    port = server.sockets[0].getsockname()[1]
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((f"{net}.7", port))  # UDP bound, never read: pings vanish
    record = Member("ghost", (f"{net}.7:{port}",))
    engine = SwimEngine("a", f"{net}.8:0", profile="host", keyring=_KEY)
    await engine.start()
    try:
        assert await engine.join([record.addresses[0]]) == 1
        assert _status(engine, "ghost") == (Status.ALIVE, 0, record.addresses[0])
        assert await engine.probe("ghost") is True
        assert tcp_pings >= 1 and engine.stats()["probe_tcp_only"] >= 1
        assert _status(engine, "ghost") == (Status.ALIVE, 0, record.addresses[0])
        assert engine.stats().get("suspected", 0) == 0
    finally:
        await engine.stop()
        server.close()
        await server.wait_closed()
        silent.close()
