"""Hubs: one doorbell shared by the connections between two event loops.

In one process: rings coalesce, wake-ups reach only the members they are
for, the last member closes the hub.  Between two processes: many
connections on one hub with traffic both ways, connections coming and
going, a peer from before hubs, and a hostile client mid-handshake."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import aiocoloc
from aiocoloc.connect import handshake, policy
from aiocoloc.connect.agreement import abandon_pipes
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.handshake import connection_key
from aiocoloc.connect.handshake_steps import read_nonce, write_nonce
from aiocoloc.control.messages import NONCE_SIZE
from aiocoloc.notify import hub
from aiocoloc.notify.doorbell import Doorbell, new_eventfd
from aiocoloc.notify.hub import Hub
from aiocoloc.shm import MemfdSegment, PipeHandle

from .conftest import open_fds
from .peers import finish, line, spawn
from .test_connect import echo, recv_message, roundtrip, send_message, until, upgraded
from .test_ring_api import ends
from .test_ring_model import make_ring
from .test_transport import LOOPS, run

PEER = Path(__file__).with_name("connect_peer.py")


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def eventfds(pid: int | str = "self") -> int:
    """How many eventfds process ``pid`` holds."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[eventfd]":
                count += 1
        except OSError:
            pass
    return count


def client_hubs() -> list[Hub]:
    return list(hub._client_hubs.get(asyncio.get_running_loop(), {}).values())


def doorbell_of(writer: asyncio.StreamWriter) -> Any:
    return writer.transport._shm.doorbell  # type: ignore[attr-defined]


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    local_pools().close_idle()
    assert open_fds() <= before, sorted(open_fds() - before)


# --- the looks a hub takes at a pipe -------------------------------------------------------


def test_a_sleeping_end_knows_when_its_sleep_is_over(ring_impl: ModuleType) -> None:
    region = make_ring(ring_impl, 16)
    producer, consumer = ends(ring_impl, region)
    assert consumer.prepare_sleep()
    assert not consumer.sleep_over()  # a ring for another pipe: stay asleep
    producer.write(b"x")
    assert consumer.sleep_over()  # bytes came (the writer has not taken the flag yet)
    assert producer.wake_needed()
    consumer.read()
    assert consumer.sleep_over()  # drained by other means, but rung: wake, sleep again
    assert consumer.prepare_sleep() and not consumer.sleep_over()
    producer.close()
    assert consumer.sleep_over()  # EOF

    producer.release(), consumer.release()
    region.close()
    region = make_ring(ring_impl, 16)
    producer, consumer = ends(ring_impl, region)
    producer.write(b"y" * 16)
    assert producer.prepare_wait(1) and not producer.wait_over()
    consumer.read(1)
    assert producer.wait_over()  # room came
    assert consumer.wake_needed()
    producer.write(b"z")
    assert producer.wait_over()  # full again, but the reader rang: wake, wait again
    assert producer.prepare_wait(1) and not producer.wait_over()
    consumer.close()
    assert producer.wait_over()  # nobody will read: the write reports it
    producer.release(), consumer.release()
    region.close()


# --- in one process ------------------------------------------------------------------------


def hub_pair(loop: asyncio.AbstractEventLoop) -> tuple[Hub, Hub]:
    """Two hubs wired to each other, as the client and the server see theirs."""
    a, b = new_eventfd(), new_eventfd()
    segment = MemfdSegment.create(hub.SEGMENT_SIZE)
    theirs = MemfdSegment.from_fd(os.dup(segment.fd))
    return (
        Hub(loop, "t", a, os.dup(b), segment, client=True),
        Hub(loop, "t", b, os.dup(a), theirs, client=False),
    )


def test_rings_coalesce_until_taken_wake_only_their_members_and_the_last_member_closes(
    loop_kind: str, no_fd_leak: None
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = hub_pair(loop)
        x1, x2 = ours.join(), ours.join()
        woken: list[str] = []
        ready = {"y1": False, "y2": False}
        members = {name: theirs.join() for name in ready}
        for name, member in members.items():
            member.listen(loop, lambda name=name: woken.append(name), lambda name=name: ready[name])

        ready["y1"] = True
        for _ in range(5):  # ten rings before the peer wakes: the first one is made, at once
            x1.ring()
            x2.ring()
        assert ours.rings == 1 and x1.rings == x2.rings == 5
        await until(lambda: woken == ["y1"], "the member the ring was for")
        assert theirs.wakeups == 1
        await asyncio.sleep(0.01)
        assert woken == ["y1"]  # y2 was not ready: it stays asleep

        x1.ring()  # the peer took the last ring: this one is made
        assert ours.rings == 2
        await until(lambda: len(woken) == 2, "the second wake-up")
        # Rings the other way are counted apart.
        members["y1"].ring()
        assert theirs.rings == 1

        x1.close()
        assert not ours.closed
        x2.close()  # the last member closes the hub, its descriptors and its mapping
        assert ours.closed
        x2.ring()  # (closed members ring no more)
        with pytest.raises(RuntimeError):
            ours.join()
        for member in members.values():
            member.close()
        assert theirs.closed

    run(loop_kind, scenario)


def test_a_failing_member_costs_the_others_nothing(loop_kind: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = hub_pair(loop)
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        woken: list[str] = []

        def fail() -> None:
            raise RuntimeError("boom")

        bad, good = theirs.join(), theirs.join()
        bad.listen(loop, fail)
        good.listen(loop, lambda: woken.append("good"))
        ringer = ours.join()
        ringer.ring()
        await until(lambda: woken == ["good"], "the good member's wake-up")
        assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)
        for member in (bad, good, ringer):
            member.close()
        assert ours.closed and theirs.closed

    run(loop_kind, scenario)


# --- between two processes -----------------------------------------------------------------


async def start_server(loop_kind: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    child = spawn(PEER, "server", loop_kind, *extra)
    return child, int(await line(child))


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rng: random.Random, total: int
) -> None:
    """Random writes and pauses one way while the echo comes back the other."""
    payload = rng.randbytes(total)

    async def send() -> None:
        sent = 0
        while sent < total:
            n = min(total - sent, rng.choice([1, 64, 1500, 40_000, 300_000]))
            writer.write(payload[sent : sent + n])
            sent += n
            if rng.random() < 0.5:
                await writer.drain()
            if rng.random() < 0.2:
                await asyncio.sleep(rng.random() * 0.002)

    sender = asyncio.get_running_loop().create_task(send())
    echoed = await reader.readexactly(total)
    await sender
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_many_connections_share_one_hub_with_traffic_both_ways(
    loop_kind: str, no_fd_leak: None
) -> None:
    async def scenario() -> None:
        child, port = await start_server(loop_kind)
        base, child_base = eventfds(), eventfds(child.pid)  # (uvloop's own: libuv's)
        try:
            streams = await asyncio.gather(
                *(aiocoloc.open_connection("127.0.0.1", port, upgrade="always") for _ in range(50))
            )
            for _, writer in streams:
                await upgraded(writer)
            (shared,) = client_hubs()
            assert shared.members == 50
            assert all(doorbell_of(w).hub is shared for _, w in streams)
            # One pair on each side.
            assert eventfds() - base == 2 and eventfds(child.pid) - child_base == 2
            rng = random.Random(7)
            totals = [rng.choice([64, 5_000, 200_000, 1_500_000]) for _ in streams]
            await asyncio.gather(
                *(
                    exchange(reader, writer, random.Random(i), total)
                    for i, ((reader, writer), total) in enumerate(zip(streams, totals, strict=True))
                )
            )
            assert shared.rings > 0 and shared.wakeups > 0
            for _, writer in streams:
                writer.close()
            for _, writer in streams:
                await writer.wait_closed()
            assert shared.closed and client_hubs() == [] and eventfds() == base
            await until(lambda: eventfds(child.pid) == child_base, "the server to close its hub")
        finally:
            finish(child)

    run(loop_kind, scenario, timeout=60)


def test_a_hub_outlives_connections_that_come_and_go_and_closes_with_the_last(
    loop_kind: str, no_fd_leak: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for the pipes of every connection: busy pipes keep what they
    # grew to for a while, and this test is about hubs, not pool capacity.
    monkeypatch.setenv("AIOCOLOC_POOL_SIZE", str(512 << 20))

    async def scenario() -> None:
        child, port = await start_server(loop_kind)
        base, child_base = eventfds(), eventfds(child.pid)
        rng = random.Random(3)
        live: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        hubs_seen: set[str] = set()

        async def close_one() -> None:
            _, writer = live.pop(rng.randrange(len(live)))
            writer.close()
            await writer.wait_closed()

        try:
            for _ in range(3):
                for _ in range(10):  # connections come and go at random
                    if live and (len(live) >= 6 or rng.random() < 0.4):
                        await close_one()
                    else:
                        reader, writer = await aiocoloc.open_connection(
                            "127.0.0.1", port, upgrade="always"
                        )
                        await upgraded(writer)
                        hubs_seen.add(doorbell_of(writer).hub.token)
                        live.append((reader, writer))
                    for reader, writer in live:  # every live one still moves bytes
                        await exchange(reader, writer, rng, rng.choice([10, 5_000]))
                    assert [h.members for h in client_hubs()] == ([len(live)] if live else [])
                    assert eventfds() - base == (2 if live else 0)
                while live:  # the last close closes the hub: a new one comes next time
                    await close_one()
                assert client_hubs() == [] and eventfds() == base
                await until(lambda: eventfds(child.pid) == child_base, "the server's hub to close")
            assert len(hubs_seen) >= 3
        finally:
            for _, writer in live:
                writer.close()
                await writer.wait_closed()
            finish(child)

    run(loop_kind, scenario, timeout=60)


def test_a_resting_hub_serves_the_next_connection_then_closes(
    loop_kind: str, no_fd_leak: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections one after the other: the hub of the first stays for the
    next one on both sides (no new eventfds anywhere), and both close once
    ``hub_linger`` passes with no connection."""
    monkeypatch.setenv("AIOCOLOC_HUB_LINGER", "0.5")  # the server process inherits it
    policy.reset()

    async def connection(port: int, rng: random.Random) -> str:
        reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(writer)
        token: str = doorbell_of(writer).hub.token
        await exchange(reader, writer, rng, 100_000)  # wake-ups both ways
        writer.close()
        await writer.wait_closed()
        return token

    async def scenario() -> None:
        child, port = await start_server(loop_kind)
        base, child_base = eventfds(), eventfds(child.pid)
        rng = random.Random(5)
        try:
            first = await connection(port, rng)
            (resting,) = client_hubs()
            assert resting.members == 0 and resting.resting and not resting.closed
            assert eventfds() - base == 2
            await until(lambda: eventfds(child.pid) - child_base == 2, "the server's hub rests")
            for _ in range(3):  # each within the linger of the one before
                assert await connection(port, rng) == first
                assert eventfds() - base == 2 and eventfds(child.pid) - child_base == 2
            await until(lambda: eventfds() == base, "our hub to close after its linger")
            assert client_hubs() == [] and resting.closed
            await until(lambda: eventfds(child.pid) == child_base, "the server's hub to close")
            assert await connection(port, rng) != first  # a new hub, working as well
            assert hub.close_resting_hubs() == 1 and eventfds() == base
        finally:
            finish(child)

    run(loop_kind, scenario, timeout=30)


def test_resting_hubs_close_with_their_server_and_their_event_loop(
    loop_kind: str, no_fd_leak: None
) -> None:
    """In one process: closing the server closes its resting hubs at once;
    a client hub left resting by a loop that closed is closed by the next hub
    that rests, or by ``close_resting_hubs``."""
    aiocoloc.configure(hub_linger=60.0)
    base = eventfds()

    async def scenario(stale: int) -> None:
        # (The loop's own eventfds, uvloop's, count in; a stale hub's leave.)
        inner = eventfds() - 2 * stale
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(writer)
        await roundtrip(reader, writer, 10_000)
        writer.close()
        await writer.wait_closed()
        table = server._endpoint.hubs  # type: ignore[attr-defined]
        await until(
            lambda: [h.resting for h in client_hubs() + table.hubs()] == [True, True],
            "both hubs to rest",
        )
        assert eventfds() - inner == 4  # ours and the server's (a stale one closed)
        server.close()
        await server.wait_closed()
        assert eventfds() - inner == 2  # the server's closed at once; ours rests on
        assert [h.resting for h in client_hubs()] == [True]

    run(loop_kind, lambda: scenario(0))
    assert eventfds() - base == 2  # its loop is closed: it will never run the timer
    run(loop_kind, lambda: scenario(1))  # the next hub to rest closes the stale one
    assert eventfds() - base == 2
    assert hub.close_resting_hubs() == 1
    assert eventfds() == base


@pytest.mark.parametrize("without", ["server", "client"])
def test_a_peer_from_before_hubs_gets_its_own_doorbells(
    loop_kind: str, without: str, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    if without == "client":
        monkeypatch.setattr(hub, "OFFER", False)

    async def scenario() -> None:
        child, port = await start_server(loop_kind, *(["nohub"] if without == "server" else []))
        base, child_base = eventfds(), eventfds(child.pid)
        try:
            streams = [
                await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                for _ in range(3)
            ]
            for reader, writer in streams:
                await upgraded(writer)
                assert type(doorbell_of(writer)) is Doorbell
                await exchange(reader, writer, random.Random(1), 300_000)
            assert client_hubs() == []  # the hub made for the offer closed at once
            assert eventfds() - base == 6 and eventfds(child.pid) - child_base == 6
            for _, writer in streams:
                writer.close()
                await writer.wait_closed()
        finally:
            finish(child)

    run(loop_kind, scenario, timeout=30)


# --- a hostile client at the server's handshake --------------------------------------------


async def _offer_hub(
    server: Any, writer: asyncio.StreamWriter, token: str
) -> tuple[socket.socket, dict[str, Any], Any]:
    """hello (offering hub ``token``), pool, join: returns the control socket,
    the server's ``pipes`` and the pool."""
    conn = connection_key(writer.get_extra_info("sockname"), writer.get_extra_info("peername"))
    loop = asyncio.get_running_loop()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.setblocking(False)
    await loop.sock_connect(control, "\0" + server.control_address[1:])
    await send_message(control, {"op": "hello", "version": 1, "conn": list(conn), "hub": token})
    offer = await recv_message(control)
    pool = local_pools().get(offer["pool"])
    assert pool is not None
    await send_message(control, {"op": "join", "slot": pool.slot})
    return control, await recv_message(control), pool


def _proof(pool: Any, pipes: dict[str, Any]) -> bytes:
    up, down = PipeHandle(*pipes["up"]), PipeHandle(*pipes["down"])
    assert read_nonce(pool, down) == pipes["nonce"]
    mine = os.urandom(NONCE_SIZE)
    write_nonce(pool, up, mine)
    return mine


def _sealed_segment() -> int:
    segment = MemfdSegment.create(hub.SEGMENT_SIZE)
    fd = os.dup(segment.fd)
    segment.close()
    return fd


def _unsealed_segment() -> int:
    fd = os.memfd_create("not-sealed")
    os.ftruncate(fd, hub.SEGMENT_SIZE)
    return fd


@pytest.mark.parametrize(
    "fault", ["hang-up", "one-fd", "not-eventfds", "unsealed", "wrong-nonce", "gone"]
)
def test_a_client_failing_a_hub_handshake_leaves_no_hub_behind(
    loop_kind: str, fault: str, no_fd_leak: None
) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="never")
            await roundtrip(reader, writer, 1000)
            base = eventfds()
            hubs = server._endpoint.hubs
            control, pipes, pool = await _offer_hub(server, writer, "a" * 32)
            keep: list[int] = []
            try:
                assert pipes["op"] == "pipes" and pipes["hub"] is False  # send us the hub
                nonce = b"x" * 16 if fault == "wrong-nonce" else _proof(pool, pipes)
                if fault == "one-fd":
                    keep = [new_eventfd()]
                elif fault == "not-eventfds":
                    keep = [*os.pipe(), _sealed_segment()]
                elif fault == "unsealed":
                    keep = [new_eventfd(), new_eventfd(), _unsealed_segment()]
                else:
                    keep = [new_eventfd(), new_eventfd(), _sealed_segment()]
                if fault != "hang-up":
                    await send_message(control, {"op": "proof", "nonce": nonce}, keep)
                if fault == "gone":  # a good proof, then the client never attaches
                    assert (await recv_message(control))["op"] == "ready"
                    assert len(hubs) == 1
                elif fault != "hang-up":
                    assert (await recv_message(control))["op"] == "refuse"
            finally:
                control.close()
                for fd in keep:
                    os.close(fd)
            if fault == "gone":  # upgraded on the server's side: its connection holds the hub
                writer.close()
                await writer.wait_closed()
                # (What the client does with pipes it gives up: the last side frees them.)
                abandon_pipes(pool, PipeHandle(*pipes["up"]), PipeHandle(*pipes["down"]))
            await until(lambda: len(hubs) == 0, "the server to forget the hub")
            await until(lambda: pool.stats()["pipes"] == 0, "the server to give the pipes back")
            assert eventfds() == base
            if fault != "gone":
                await roundtrip(reader, writer, 1000)
                writer.close()
                await writer.wait_closed()

    run(loop_kind, scenario)


def test_a_known_hub_is_joined_without_descriptors_and_kept_for_its_members(
    loop_kind: str, no_fd_leak: None
) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            base = eventfds()
            a = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(a[1])
            (shared,) = client_hubs()
            hubs = server._endpoint.hubs
            assert len(hubs) == 1
            b = await aiocoloc.open_connection("127.0.0.1", port, upgrade="never")
            # A handshake offering the known hub, abandoned after ``pipes``.
            control, pipes, pool = await _offer_hub(server, b[1], shared.token)
            assert pipes["hub"] is True
            control.close()
            await until(lambda: pool.stats()["pipes"] == 2, "the abandoned pipes to go")
            assert len(hubs) == 1 and eventfds() - base == 4  # the first connection keeps it
            await roundtrip(*a, 100_000)
            for _, writer in (a, b):
                writer.close()
                await writer.wait_closed()
            await until(lambda: len(hubs) == 0, "the server's hub to close")
            assert shared.closed and eventfds() == base

    run(loop_kind, scenario)


# --- a pool proved over a hub ----------------------------------------------------------------


async def _proved_once(server: Any) -> tuple[Any, Hub, Hub, Any]:
    """A first connection to ``server``, upgraded (its handshake proves the
    pool over a new hub): the streams, our hub, the server's, the pool."""
    port = server.sockets[0].getsockname()[1]
    first = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
    await upgraded(first[1])
    (ours,) = client_hubs()
    (theirs,) = server._endpoint.hubs.hubs()
    pool = local_pools().get(first[1].transport.get_extra_info("aiocoloc")["pool"])
    assert pool is not None
    return first, ours, theirs, pool


async def _close_and_rest(server: Any, *connections: Any) -> None:
    for _, writer in connections:
        writer.close()
        await writer.wait_closed()
    await until(lambda: not server._endpoint.hubs.hubs(), "the server's hub to close")


def test_a_pool_proved_over_a_hub_is_not_proved_again(
    loop_kind: str, no_fd_leak: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second connection over a hub skips the client's proof (hello says
    proven, pipes says ready: no proof, no ready) and carries its bytes."""
    sent: list[Any] = []
    original = handshake.send

    async def recording(channel: Any, message: Any, fds: Any = ()) -> None:
        sent.append(message)
        await original(channel, message, fds)

    monkeypatch.setattr(handshake, "send", recording)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            a, ours, theirs, pool = await _proved_once(server)
            # (In one process the client maps the server's pool already: no pool/join.)
            assert [m.OP for m in sent] == ["hello", "pipes", "proof", "ready"]
            assert ours.proven == theirs.proven == {(str(pool.id), pool.slot)}
            sent.clear()
            port = server.sockets[0].getsockname()[1]
            b = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(b[1])
            assert [m.OP for m in sent] == ["hello", "pipes"]
            assert sent[0].proven is True and sent[1].ready is True
            await roundtrip(*b, 300_000)
            await roundtrip(*a, 300_000)
            await _close_and_rest(server, a, b)

    run(loop_kind, scenario)


def test_a_proven_claim_the_server_does_not_share_gets_the_whole_handshake(
    loop_kind: str, no_fd_leak: None
) -> None:
    """``proven`` is the client's claim; a server that did not see that proof
    over that hub asks for it as always (``pipes`` without ``ready``)."""

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            a, shared, theirs, pool = await _proved_once(server)
            theirs.proven.clear()  # (as if the proof had been over another hub)
            port = server.sockets[0].getsockname()[1]
            b = await aiocoloc.open_connection("127.0.0.1", port, upgrade="never")
            conn = connection_key(b[1].get_extra_info("sockname"), b[1].get_extra_info("peername"))
            control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(control, "\0" + server.control_address[1:])
            hello = {"op": "hello", "version": 1, "conn": list(conn), "hub": shared.token}
            hello.update(pool=str(pool.id), slot=pool.slot, proven=True)
            await send_message(control, hello)
            pipes = await recv_message(control)
            assert pipes["op"] == "pipes" and pipes["hub"] is True and "ready" not in pipes
            await send_message(control, {"op": "proof", "nonce": _proof(pool, pipes)})
            assert (await recv_message(control))["op"] == "ready"
            assert theirs.proven == {(str(pool.id), pool.slot)}
            control.close()
            await roundtrip(*a, 100_000)
            await _close_and_rest(server, a, b)

    run(loop_kind, scenario)
