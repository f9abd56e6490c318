"""The connection API: asyncio's stream and loop entry points, upgraded to
shared memory between co-located endpoints, and plain TCP otherwise."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trustme

import aiocoloc
from aiocoloc.connect import policy
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.registry import Registry
from aiocoloc.transport import fallback

from .conftest import open_fds
from .test_transport import LOOPS, run

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def info(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> dict[str, Any]:
    transport = writer.transport if isinstance(writer, asyncio.StreamWriter) else writer
    result: dict[str, Any] = transport.get_extra_info("aiocoloc")
    return result


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def upgraded(writer: asyncio.StreamWriter) -> None:
    await until(
        lambda: info(writer)["mode"] == "shm" and info(writer)["rx_mode"] == "shm",
        f"the upgrade ({info(writer)})",
    )


async def fell_back(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> str:
    await until(lambda: info(writer)["fallback_reason"] is not None, "a fallback reason")
    reason: str = info(writer)["fallback_reason"]
    return reason


def no_pools_in_use() -> None:
    assert local_pools().in_use() == {}, local_pools().in_use()
    local_pools().close_idle()  # lingering ones too: the fd checks count them


# --- the streams drop-in: the same transcript as asyncio's own streams ------------------


async def echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if line == b"big\n":
                writer.write(os.urandom(0) + b"x" * 300_000 + b"\n")
            elif line == b"banner?\n":
                writer.write(b"no banner\n")
            else:
                writer.write(line.upper())
            await writer.drain()
        writer.write(b"bye")
        await writer.drain()
    finally:
        writer.close()


async def transcript(
    open_connection: Callable[..., Awaitable[Streams]],
    start_server: Callable[..., Awaitable[asyncio.AbstractServer]],
    wait_upgrade: bool,
) -> list[Any]:
    """Exercise the stream API; the list of what came back must not depend on
    the implementation."""
    out: list[Any] = []
    server = await start_server(echo_lines, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await open_connection("127.0.0.1", port, limit=1024)
        writer.write(b"hello\n")
        out.append(await reader.readline())
        if wait_upgrade:
            await upgraded(writer)
        writer.writelines([b"a", b"b", b"c\n"])
        out.append(await reader.readexactly(4))
        writer.write(b"one;two;\n")
        out.append(await reader.readuntil(b";"))
        out.append(await reader.readuntil(b";"))
        out.append(await reader.read(1))
        writer.write(b"big\n")
        with pytest.raises(ValueError) as overrun:  # more than the limit without a newline
            await reader.readline()
        out.append(type(overrun.value).__name__)
        rest = b""
        while not rest.endswith(b"\n"):
            rest += await reader.read(65536)
        out.append(set(rest[:-1]) <= {ord("x")})  # how much readline dropped depends on chunking
        writer.write_eof()  # half-close: the server still answers
        out.append(writer.can_write_eof())
        out.append(await reader.read())
        out.append(reader.at_eof())
        with pytest.raises(asyncio.IncompleteReadError) as short:
            await reader.readexactly(1)
        out.append(short.value.partial)
        out.append(writer.get_extra_info("peername")[1] == port)
        writer.close()
        await writer.wait_closed()
        out.append(writer.is_closing())
    return out


def test_streams_behave_as_asyncio_streams_before_and_after_the_upgrade(loop_kind: str) -> None:
    async def scenario() -> None:
        expected = await transcript(asyncio.open_connection, asyncio.start_server, False)
        aiocoloc.configure(upgrade="always")
        assert await transcript(aiocoloc.open_connection, aiocoloc.start_server, True) == expected
        policy.reset()
        assert await transcript(aiocoloc.open_connection, aiocoloc.start_server, False) == expected
        await asyncio.sleep(0.05)
        no_pools_in_use()

    run(loop_kind, scenario)


def test_server_speaks_first_and_client_writes_before_the_upgrade(loop_kind: str) -> None:
    async def banner_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 welcome\r\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await aiocoloc.start_server(banner_then_echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            payload = os.urandom(2 << 20)
            for i in range(0, len(payload), 4096):  # written before the upgrade can finish
                writer.write(payload[i : i + 4096])
            assert await reader.readexactly(13) == b"220 welcome\r\n"
            assert await reader.readexactly(len(payload)) == payload
            await upgraded(writer)
            more = os.urandom(1 << 20)
            writer.write(more)
            assert await reader.readexactly(len(more)) == more
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


# --- the upgrade policy ------------------------------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    data = os.urandom(n)
    writer.write(data)
    assert await reader.readexactly(n) == data


def test_auto_upgrades_after_its_traffic_threshold(loop_kind: str) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade=50_000)
            for _ in range(10):  # 20 KB in all: below the threshold
                await roundtrip(reader, writer, 1000)
            await asyncio.sleep(0.1)
            assert info(writer)["mode"] == "tcp" and info(writer)["fallback_reason"] is None
            await roundtrip(reader, writer, 40_000)
            await upgraded(writer)
            await roundtrip(reader, writer, 100_000)
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


@pytest.mark.parametrize("how", ["per call", "environment", "configure"])
def test_never_keeps_tcp_and_says_why(
    loop_kind: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "environment":
        monkeypatch.setenv("AIOCOLOC_MODE", "never")
        policy.reset()
    elif how == "configure":
        aiocoloc.configure(upgrade="never")

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, upgrade="always")
        async with server:
            port = server.sockets[0].getsockname()[1]
            kw = {"upgrade": "never"} if how == "per call" else {}
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, **kw)
            await roundtrip(reader, writer, 200_000)
            assert await fell_back(writer) == fallback.DISABLED
            assert info(writer)["mode"] == "tcp"
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_policy_strings_are_checked() -> None:
    assert policy.parse_upgrade("auto").after == policy.AUTO_UPGRADE_AFTER
    assert policy.parse_upgrade("always").after == 0
    assert policy.parse_upgrade("never").never
    assert policy.parse_upgrade("4096").after == 4096
    assert policy.parse_upgrade(10).after == 10
    for bad in ("sometimes", -1, True, "1e3"):
        with pytest.raises(ValueError, match="upgrade"):
            policy.parse_upgrade(bad)  # type: ignore[arg-type]
    assert policy.parse_trust("same-uid").allows(os.getuid())
    assert not policy.parse_trust("never").allows(os.getuid())
    assert policy.parse_trust("uids:1, 2").allows(2)
    assert not policy.parse_trust("uids:1,2").allows(os.getuid() + 3)
    for bad_trust in ("everyone", "uids:", "uids:x"):
        with pytest.raises(ValueError, match="trust"):
            policy.parse_trust(bad_trust)
    with pytest.raises(ValueError, match="handshake_timeout"):
        aiocoloc.configure(handshake_timeout=0)
    with pytest.raises(ValueError, match="pool_size"):
        aiocoloc.configure(pool_size=4096)
    with pytest.raises(TypeError, match="unknown settings: colour"):
        aiocoloc.configure(colour="blue")
    # Nothing changed by the refusals (the tests' environment sets hub_linger).
    assert policy.current() == policy.Settings(hub_linger=0.0)


def test_the_smallest_pool_allowed_still_serves(loop_kind: str) -> None:
    """``configure()`` once accepted a pool too small for its own tables:
    the server then quietly kept every client on TCP."""
    with pytest.raises(ValueError, match="pool_size"):
        aiocoloc.configure(pool_size=policy.MIN_POOL_SIZE - 1)
    aiocoloc.configure(pool_size=policy.MIN_POOL_SIZE)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(writer)
            await roundtrip(reader, writer, 1 << 20)
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_bad_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCOLOC_MODE", "fast")
    policy.reset()
    with pytest.raises(ValueError, match="upgrade must be"):
        policy.current()


# --- mixed peers ---------------------------------------------------------------------------


def test_aiocoloc_client_of_a_plain_asyncio_server(loop_kind: str) -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            before = fallback.stats()["fallbacks"].get(fallback.NO_REGISTRY_ENTRY, 0)
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await roundtrip(reader, writer, 300_000)
            assert await fell_back(writer) == fallback.NO_REGISTRY_ENTRY
            after = fallback.stats()["fallbacks"][fallback.NO_REGISTRY_ENTRY]
            assert after == before + 1
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_plain_asyncio_client_of_an_aiocoloc_server(loop_kind: str) -> None:
    modes: list[dict[str, Any]] = []

    async def remember(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        modes.append(info(writer))
        await echo(reader, writer)

    async def scenario() -> None:
        server = await aiocoloc.start_server(remember, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await roundtrip(reader, writer, 300_000)
            writer.close()
            await writer.wait_closed()
        assert modes[0]["mode"] == "tcp"

    run(loop_kind, scenario)


# --- every fallback reason, on purpose --------------------------------------------------


class FakeControl:
    """A control endpoint we script, advertised for a real (plain) TCP server."""

    def __init__(
        self, behave: Callable[[socket.socket], Awaitable[None]], pool: str | None = None
    ) -> None:
        self.pool = pool  # the pool id advertised (a client that has it open offers it)
        self.address = f"@aiocoloc-test-{os.getpid()}-{os.urandom(6).hex()}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + self.address[1:])
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.behave = behave
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.AbstractServer | None = None
        self.record: Any = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        self.record = Registry().publish("127.0.0.1", port, self.address, pool=self.pool)
        self.tasks.append(asyncio.get_running_loop().create_task(self._accept()))
        return port

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            sock.setblocking(False)
            self.tasks.append(loop.create_task(self._run(sock)))

    async def _run(self, sock: socket.socket) -> None:
        try:
            await self.behave(sock)
        finally:
            sock.close()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.listener.close()
        Registry().withdraw(self.record)
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def recv_message(sock: socket.socket) -> dict[str, Any]:
    from aiocoloc.control import FrameDecoder

    decoder = FrameDecoder()
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ConnectionError("client went away")
        messages = decoder.feed(data)
        if messages:
            return messages[0]


async def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    from aiocoloc.control import encode_frame

    frame = encode_frame(message)
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        await asyncio.get_running_loop().sock_sendall(sock, frame)


async def stall(sock: socket.socket) -> None:
    await asyncio.sleep(3600)


async def garbage(sock: socket.socket) -> None:
    await recv_message(sock)
    await asyncio.get_running_loop().sock_sendall(sock, b"\x00\x00\x00\x05" + b"\xc1" * 5)
    await asyncio.sleep(3600)


async def hang_up(sock: socket.socket) -> None:
    await recv_message(sock)


async def old_version(sock: socket.socket) -> None:
    await recv_message(sock)
    await send_message(sock, {"op": "pool", "version": 99, "pool": "x"})
    await asyncio.sleep(3600)


async def not_a_memfd(sock: socket.socket) -> None:
    await recv_message(sock)
    r, w = os.pipe()
    try:
        await send_message(sock, {"op": "pool", "version": 1, "pool": "x"}, [r])
    finally:
        os.close(r)
        os.close(w)
    await asyncio.sleep(3600)


async def wrong_nonce(sock: socket.socket) -> None:
    from aiocoloc.shm import MemfdSegment, Pool, PoolConfig

    await recv_message(sock)
    pool = Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=16384, max_pipes=4))
    bell = os.eventfd(0)
    try:
        await send_message(
            sock, {"op": "pool", "version": 1, "pool": str(pool.id)}, [pool.segment.fd]
        )
        joined = await recv_message(sock)
        up = pool.create_pipe(joined["slot"], pool.slot)
        down = pool.create_pipe(pool.slot, joined["slot"])
        producer = pool.pipe_producer(down)
        producer.write(b"A" * 16)
        producer.release()
        await send_message(
            sock,
            {
                "op": "pipes",
                "up": [up.slot, up.generation],
                "down": [down.slot, down.generation],
                "nonce": b"B" * 16,
            },
            [bell],
        )
        await asyncio.sleep(3600)
    finally:
        os.close(bell)
        pool.close()


FAKES = {
    fallback.TIMED_OUT: stall,
    fallback.PROTOCOL_ERROR: garbage,
    fallback.VERSION_MISMATCH: old_version,
    fallback.POOL_NOT_MAPPABLE: not_a_memfd,
    fallback.PROOF_FAILED: wrong_nonce,
}


@pytest.mark.parametrize("reason", [*FAKES, "hang up"])
def test_a_bad_control_endpoint_leaves_the_connection_on_tcp(loop_kind: str, reason: str) -> None:
    behave = FAKES.get(reason, hang_up)
    expected = fallback.PROTOCOL_ERROR if reason == "hang up" else reason

    async def scenario() -> None:
        aiocoloc.configure(upgrade="always", handshake_timeout=0.5)
        fake = FakeControl(behave)
        port = await fake.start()
        try:
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port)
            await roundtrip(reader, writer, 100_000)
            assert await fell_back(writer) == expected
            assert info(writer)["mode"] == "tcp" and info(writer)["fallback_detail"]
            await roundtrip(reader, writer, 500_000)  # still a working connection
            writer.close()
            await writer.wait_closed()
        finally:
            await fake.close()
        no_pools_in_use()

    fds = open_fds()
    run(loop_kind, scenario)
    assert open_fds() <= fds, sorted(open_fds() - fds)


def test_advertised_endpoint_that_is_gone(loop_kind: str) -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        record = Registry().publish("127.0.0.1", port, "@aiocoloc-nobody-listens-here")
        async with server:
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await roundtrip(reader, writer, 10_000)
            assert await fell_back(writer) == fallback.NOT_AIOCOLOC
            writer.close()
            await writer.wait_closed()
        Registry().withdraw(record)

    run(loop_kind, scenario)


def test_endpoint_of_another_server_does_not_know_the_connection(loop_kind: str) -> None:
    async def scenario() -> None:
        other = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        plain = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = plain.sockets[0].getsockname()[1]
        assert other.control_address is not None
        record = Registry().publish("127.0.0.1", port, other.control_address)
        async with other, plain:
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await roundtrip(reader, writer, 10_000)
            assert await fell_back(writer) == fallback.UNKNOWN_CONNECTION
            writer.close()
            await writer.wait_closed()
        Registry().withdraw(record)
        await asyncio.sleep(0.05)
        no_pools_in_use()

    run(loop_kind, scenario)


@pytest.mark.parametrize("side", ["client", "server"])
def test_untrusted_peer_stays_on_tcp(loop_kind: str, side: str) -> None:
    server_modes: list[asyncio.StreamWriter] = []

    async def remember(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_modes.append(writer)
        await echo(reader, writer)

    async def scenario() -> None:
        other_user = f"uids:{os.getuid() + 12345}"
        server_trust = other_user if side == "server" else "same-uid"
        client_trust = other_user if side == "client" else "same-uid"
        server = await aiocoloc.start_server(remember, "127.0.0.1", 0, trust=server_trust)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection(
                "127.0.0.1", port, upgrade="always", trust=client_trust
            )
            await roundtrip(reader, writer, 10_000)
            assert await fell_back(writer) == fallback.NOT_TRUSTED
            if side == "server":
                assert await fell_back(server_modes[0]) == fallback.NOT_TRUSTED
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_exhausted_pool_stays_on_tcp(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiocoloc.connect import colocation
    from aiocoloc.shm import PoolConfig

    monkeypatch.setattr(
        colocation, "SERVING_POOL", PoolConfig(slice_size=65536, max_members=8, max_pipes=2)
    )
    monkeypatch.setattr(colocation, "MAX_SERVING_POOLS", 1)  # (else it opens another)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            first = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(first[1])
            second = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await roundtrip(*second, 100_000)
            assert await fell_back(second[1]) == fallback.POOL_EXHAUSTED
            await roundtrip(*first, 100_000)
            for _, writer in (first, second):
                writer.close()
                await writer.wait_closed()
        await asyncio.sleep(0.05)
        no_pools_in_use()

    run(loop_kind, scenario)


def test_a_client_leaving_mid_handshake_leaves_no_pipes(loop_kind: str) -> None:
    from aiocoloc.connect.handshake import connection_key

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="never")
            await roundtrip(reader, writer, 1000)
            conn = connection_key(
                writer.get_extra_info("sockname"), writer.get_extra_info("peername")
            )
            assert server.control_address is not None
            loop = asyncio.get_running_loop()
            control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control.setblocking(False)
            await loop.sock_connect(control, "\0" + server.control_address[1:])
            await send_message(control, {"op": "hello", "version": 1, "conn": list(conn)})
            offer = await recv_message(control)
            assert offer["op"] == "pool"
            pool = local_pools().get(offer["pool"])
            assert pool is not None
            await send_message(control, {"op": "join", "slot": pool.slot})
            assert (await recv_message(control))["op"] == "pipes"
            assert pool.stats()["pipes"] == 2
            control.close()  # gone before the proof
            await until(lambda: pool.stats()["pipes"] == 0, "the server to give the pipes back")
            await roundtrip(reader, writer, 1000)
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


# --- loop entry points and keywords --------------------------------------------------------


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.transport: Any = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def test_create_connection_with_a_connected_sock_and_server_keywords(loop_kind: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound.bind(("127.0.0.1", 0))
        server = await aiocoloc.create_server(
            loop, EchoProtocol, sock=bound, backlog=10, start_serving=False, upgrade="always"
        )
        assert not server.is_serving()
        await server.start_serving()
        assert server.is_serving()
        port = server.sockets[0].getsockname()[1]
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        transport, protocol = await aiocoloc.create_connection(
            loop, Collect, sock=sock, upgrade="always"
        )
        assert isinstance(transport, aiocoloc.SwitchableTransport)
        assert isinstance(protocol, Collect)
        await until(lambda: info(transport)["mode"] == "shm", "the upgrade of a sock= connection")
        payload = os.urandom(1 << 20)
        transport.write(payload)
        await until(lambda: len(protocol.data) == len(payload), "the echo")
        assert protocol.data == payload
        transport.close()
        assert await protocol.lost is None
        serving = loop.create_task(server.serve_forever())
        await asyncio.sleep(0)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert not server.is_serving()
        await server.wait_closed()
        assert Registry().lookup("127.0.0.1", port) == []  # its record went with it

    run(loop_kind, scenario)


def test_connection_errors_are_asyncios(loop_kind: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        with pytest.raises(ConnectionRefusedError):
            await aiocoloc.open_connection("127.0.0.1", port)
        with pytest.raises(ValueError, match="server_hostname is only meaningful with ssl"):
            await aiocoloc.create_connection(loop, Collect, "127.0.0.1", port, server_hostname="x")
        with pytest.raises(ValueError, match="You must set server_hostname"):
            sock = socket.socket()
            try:
                await aiocoloc.create_connection(loop, Collect, sock=sock, ssl=True)
            finally:
                sock.close()
        with pytest.raises(TypeError, match="SSLContext"):
            await aiocoloc.create_server(loop, EchoProtocol, "127.0.0.1", 0, ssl=True)

    run(loop_kind, scenario)


@pytest.mark.parametrize("failing", ["connection_made", "data_received", "eof_received"])
def test_a_failing_protocol_meets_what_the_loop_itself_does(loop_kind: str, failing: str) -> None:
    """On TCP the loop's own transport calls the protocol (through the
    TcpAdapter): a protocol that raises gets exactly what it gets from the loop
    itself -- the same report, the connection closed or kept the same way."""

    class Failing(asyncio.Protocol):
        def __init__(self) -> None:
            self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            if failing == "connection_made":
                raise RuntimeError("boom")

        def data_received(self, data: bytes) -> None:
            if failing == "data_received":
                raise RuntimeError("boom")

        def eof_received(self) -> bool:
            if failing == "eof_received":
                raise RuntimeError("boom")
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.lost.done():
                self.lost.set_result(exc)

    async def outcome(serve: Callable[..., Awaitable[Any]]) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        reports: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reports.append(context))
        protocols: list[Failing] = []

        def factory() -> Failing:
            protocols.append(Failing())
            return protocols[-1]

        server = await serve(loop, factory, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            writer.write_eof()
            try:  # closed by the server, or kept open
                closed = await asyncio.wait_for(reader.read(), 0.5) == b""
            except TimeoutError:
                closed = False
            writer.close()
            try:
                lost = type(await asyncio.wait_for(protocols[0].lost, 0.5)).__name__
            except TimeoutError:
                lost = "no connection_lost"
            for protocol in protocols:  # asyncio's server.close() leaves them open
                if protocol.transport is not None:
                    protocol.transport.abort()
        finally:
            server.close()
            await server.wait_closed()
            loop.set_exception_handler(None)
        return (
            closed,
            lost,
            [type(r.get("exception")).__name__ for r in reports],
            # The words, not the object names ("Exception in callback
            # <callback>(...)" names the loop's callback: ours is the TcpAdapter's).
            [r["message"].split("(")[0].split(" on ")[0].rsplit(".", 1)[-1] for r in reports],
        )

    async def scenario() -> None:
        loop_own = await outcome(lambda loop, *args: loop.create_server(*args))
        ours = await outcome(aiocoloc.create_server)
        assert ours == loop_own
        assert loop_own[2] == ["RuntimeError"]  # reported once

    run(loop_kind, scenario)


def test_tls_rides_on_shared_memory(loop_kind: str) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, ssl=server_context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="localhost", upgrade="always"
            )
            assert writer.get_extra_info("peercert") is not None
            await upgraded(writer)  # the TLS transport shows the layer below it
            payload = os.urandom(3 << 20)
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


@pytest.mark.parametrize("upgrade", ["never", "always"])
def test_starttls_with_the_loops_own_start_tls(loop_kind: str, upgrade: str) -> None:
    """``StreamWriter.start_tls`` (``loop.start_tls``: STARTTLS in SMTP, IMAP,
    PostgreSQL clients) on both ends.  uvloop's start_tls refused any
    transport but its own until aiocoloc taught it ours."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"go ahead\n")
        await writer.drain()
        await writer.start_tls(server_context)
        await echo(reader, writer)

    async def scenario() -> None:
        server = await aiocoloc.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade=upgrade)
            if upgrade == "always":
                await upgraded(writer)
            writer.write(b"STARTTLS\n")
            assert await reader.readline() == b"go ahead\n"
            await writer.start_tls(client_context, server_hostname="localhost")
            assert writer.get_extra_info("peercert") is not None
            payload = os.urandom(1 << 20)
            writer.write(payload)
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_install_routes_unmodified_asyncio_code(loop_kind: str) -> None:
    async def scenario() -> None:
        aiocoloc.configure(upgrade="always")
        aiocoloc.install()
        try:
            assert aiocoloc.installed()
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            assert isinstance(server, aiocoloc.Server)
            async with server:
                port = server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await upgraded(writer)
                await roundtrip(reader, writer, 1 << 20)
                writer.close()
                await writer.wait_closed()
        finally:
            aiocoloc.uninstall()
        assert not aiocoloc.installed()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        assert not isinstance(server, aiocoloc.Server)
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario)


@pytest.mark.parametrize("upgrade", ["auto", "always"])
def test_a_closed_connection_is_freed_without_the_cycle_collector(
    loop_kind: str, upgrade: str
) -> None:
    """Connections must not leave reference cycles of ours behind (they made
    every short connection slower through garbage collection, and an upgraded
    one kept its pipe ends and control link).  asyncio's own selector
    transport has a cycle of its own; only our objects count."""
    import gc

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(64)
        writer.write(b"x" * 1024)
        await writer.drain()
        writer.close()

    async def scenario() -> list[str]:
        server = await aiocoloc.start_server(answer, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(20):
                    reader, writer = await aiocoloc.open_connection(
                        "127.0.0.1", port, upgrade=upgrade
                    )
                    if upgrade == "always":
                        await upgraded(writer)
                    writer.write(b"K" * 64)
                    await reader.readexactly(1024)
                    writer.close()
                    await writer.wait_closed()
                    del reader, writer
                await asyncio.sleep(0.01)
                gc.collect()
                ours = [
                    type(o).__qualname__
                    for o in gc.garbage
                    if type(o).__module__.startswith("aiocoloc")
                    or getattr(o, "__module__", "").startswith("aiocoloc")
                ]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        return ours

    assert run(loop_kind, scenario) == []


def test_a_server_frees_closed_connections_at_once_and_still_upgrades(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's control endpoint looks connections up only when a client
    asks: closed ones must not stay alive in its books, nor make them grow."""
    import gc
    import weakref

    from aiocoloc.connect import endpoint

    monkeypatch.setattr(endpoint, "PRUNE_MIN", 8)
    served: list[weakref.ref[asyncio.BaseTransport]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(weakref.ref(writer.transport))
        await echo(reader, writer)

    async def scenario() -> None:
        server = await aiocoloc.start_server(handler, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            endpoint = server._endpoint
            assert endpoint is not None
            gc.disable()  # freed by reference counting, or not at all
            try:
                # An upgrade makes the server index every connection open then.
                held = [await aiocoloc.open_connection("127.0.0.1", port) for _ in range(5)]
                reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                await upgraded(writer)
                for _, w in [*held, (reader, writer)]:
                    w.close()
                    await w.wait_closed()
                del held, reader, writer, w
                for _ in range(40):
                    reader, writer = await aiocoloc.open_connection("127.0.0.1", port)
                    await roundtrip(reader, writer, 100)
                    writer.close()
                    await writer.wait_closed()
                    del reader, writer
                await until(lambda: all(ref() is None for ref in served), "server sides freed")
            finally:
                gc.enable()
            assert len(endpoint._unindexed) + len(endpoint._connections) <= 2 * 8
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await roundtrip(reader, writer, 1000)
            await upgraded(writer)
            await roundtrip(reader, writer, 1 << 16)
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback_upgrades_too(loop_kind: str) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "::1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("::1", port, upgrade="always")
            await roundtrip(reader, writer, 1000)
            await upgraded(writer)
            await roundtrip(reader, writer, 1 << 20)
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_closing_while_the_upgrade_runs_leaks_nothing(loop_kind: str) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            for delay in (0, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.005) * 2:
                _, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                await asyncio.sleep(delay)  # somewhere in the handshake
                writer.close()
                await writer.wait_closed()
            await until(lambda: list(local_pools().in_use().values()) == [1], "pipes back")
            pool = local_pools().get(next(iter(local_pools().in_use())))
            assert pool is not None
            await until(lambda: pool.stats()["pipes"] == 0, "the server's pipes back")
        no_pools_in_use()

    fds = open_fds()
    run(loop_kind, scenario)
    assert open_fds() <= fds, sorted(open_fds() - fds)


def test_many_connections_upgrade_at_once_and_share_the_pool(loop_kind: str) -> None:
    """More connections than the pool holds at the pipes' first size: later
    ones start smaller, all upgrade, all bytes arrive."""

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            streams = await asyncio.gather(
                *(aiocoloc.open_connection("127.0.0.1", port, upgrade="always") for _ in range(48))
            )
            await asyncio.gather(*(upgraded(writer) for _, writer in streams))

            async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await roundtrip(reader, writer, 256 * 1024)

            await asyncio.gather(*(exchange(*pair) for pair in streams))
            pool_id = info(streams[0][1])["pool"]
            assert {info(writer)["pool"] for _, writer in streams} == {pool_id}
            for _, writer in streams:
                writer.close()
                await writer.wait_closed()

    run(loop_kind, scenario, timeout=60)


def test_connections_outlive_their_server(loop_kind: str) -> None:
    """As with asyncio: closing a server stops new connections, not the
    upgraded ones already made."""

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(writer)
        server.close()
        await server.wait_closed()
        await roundtrip(reader, writer, 1 << 20)
        assert info(writer)["mode"] == "shm"
        writer.close()
        await writer.wait_closed()
        await until(lambda: local_pools().in_use() == {}, "the pools to be released")

    run(loop_kind, scenario)


def test_half_close_while_the_upgrade_runs(loop_kind: str) -> None:
    """write_eof() before the upgrade could switch our direction: the bytes and
    the EOF still arrive, and the answer comes back whole."""

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            for delay in (0, 0.001, 0.002, 0.004):
                reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                payload = os.urandom(300_000)
                writer.write(payload)
                await asyncio.sleep(delay)
                writer.write_eof()
                assert await reader.read() == payload
                assert info(writer)["fallback_reason"] is None
                writer.close()
                await writer.wait_closed()

    run(loop_kind, scenario)


def test_default_policy_upgrades_mid_stream_with_bytes_in_flight_both_ways(loop_kind: str) -> None:
    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port)  # "auto"
            payload = os.urandom(6 << 20)

            async def send() -> None:
                for i in range(0, len(payload), 100_000):  # crosses the threshold mid-write
                    writer.write(payload[i : i + 100_000])
                    await writer.drain()

            sending = asyncio.get_running_loop().create_task(send())
            echoed = await reader.readexactly(len(payload))
            await sending
            assert echoed == payload
            assert info(writer)["mode"] == "shm" and info(writer)["switches"] == 1
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_trust_from_the_environment(loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCOLOC_TRUST", "never")
    policy.reset()

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, trust="same-uid")
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await roundtrip(reader, writer, 10_000)
            assert await fell_back(writer) == fallback.NOT_TRUSTED
            writer.close()
            await writer.wait_closed()

    run(loop_kind, scenario)


def test_an_unused_pool_lingers_then_closes(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiocoloc.connect import colocation

    monkeypatch.setattr(colocation, "LINGER", 0.3)

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0, upgrade="always")
        port = server.sockets[0].getsockname()[1]
        _, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(writer)
        pool_id = info(writer)["pool"]
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        await until(lambda: local_pools().in_use() == {}, "no more users")
        assert pool_id in local_pools().open_pools()  # kept for a next connection
        await until(lambda: pool_id not in local_pools().open_pools(), "the pool to close", 3)

    run(loop_kind, scenario)


def test_lingering_pools_are_watched_by_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Releasing the last reference used to start a timer thread each time
    (40-100 us of the event loop's time per upgraded connection)."""
    from aiocoloc.connect import colocation

    monkeypatch.setattr(colocation, "LINGER", 0.3)
    pools = colocation.LocalPools()

    def lingerers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "aiocoloc-pool-linger"]

    ids = set()
    for _ in range(5):
        pool = pools.serving(policy.MIN_POOL_SIZE)
        ids.add(str(pool.id))
        pools.release(pool)  # the last reference: it lingers
        assert len(lingerers()) == 1
    assert pools.open_pools() == list(ids)  # one pool, taken back each time
    deadline = time.monotonic() + 3
    while (pools.open_pools() or lingerers()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pools.open_pools() == [] and lingerers() == []


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_debug_counts_follow_connections_and_return_to_zero(loop_kind: str) -> None:
    """What the leak fixture relies on: each upgraded connection counts its
    transport, control channel and pool reference, and gives all back."""
    from aiocoloc import debug

    base = debug.live.snapshot()

    def grown() -> dict[str, int]:
        return {k: v - base[k] for k, v in debug.live.snapshot().items()}

    async def scenario() -> None:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            writers = []
            for _ in range(3):
                reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                await upgraded(writer)
                await roundtrip(reader, writer, 1000)
                writers.append(writer)
            now = grown()
            assert now["transports"] == 6  # both ends of each
            assert now["control_channels"] == 6
            assert now["pool_refs"] >= 6  # each end's, plus the server's own
            assert now["pipe_ends"] == 12  # a producer and a consumer at each end
            for writer in writers:
                writer.close()
                await writer.wait_closed()
            await until(lambda: grown()["transports"] == 0, "the transports to go")
        await until(lambda: grown()["control_channels"] == 0, "the channels to close")
        await until(lambda: grown()["pool_refs"] == 0, "the pool references to go")
        assert grown()["pipe_ends"] == 0

    run(loop_kind, scenario)
