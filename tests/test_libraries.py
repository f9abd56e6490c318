"""Unmodified third-party asyncio libraries riding on aiocoloc through
``aiocoloc.install()``, with the server in a child process
(tests/library_peer.py), on asyncio's loop and on uvloop:

- an aiohttp server and client: several requests, then a large streamed
  download and a large streamed upload, byte-exact, over shared memory;
- aiohttp's own connect path: its connector connects a socket itself and
  hands it over as ``create_connection(..., sock=sock)`` with no host or
  port -- the connection must upgrade all the same;
- a websockets echo: text and a large binary message.

Both ends must report shared memory in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

import aiocoloc

from .library_peer import pattern
from .test_transport import LOOPS, run

PEER = Path(__file__).with_name("library_peer.py")
#: How long a connection may take to reach shared memory in both directions.
UPGRADE_DEADLINE = 5.0


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def colocated() -> Iterator[None]:
    """aiocoloc installed on every loop of this process, upgrading at once."""
    aiocoloc.install()
    aiocoloc.configure(upgrade="always")
    try:
        yield
    finally:
        aiocoloc.uninstall()


@contextlib.contextmanager
def peer(loop_kind: str, server: str) -> Iterator[int]:
    """Run ``server`` in a child process; yield its port.  On a clean exit of
    the block the child is told to stop (stdin closed) and must exit 0."""
    with subprocess.Popen(
        [sys.executable, str(PEER), loop_kind, server],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, f"the {server} peer printed no port within 30 s"
            line = child.stdout.readline()
            assert line.strip().isdigit(), f"peer said {line!r}, exit status {child.poll()}"
            yield int(line)
            child.stdin.close()
            assert child.wait(timeout=15) == 0, "the peer reported errors (see its stderr)"
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()


def watch_loop_errors() -> list[dict[str, Any]]:
    """Collect what the running loop reports to its exception handler."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return errors


@dataclass
class Connect:
    """One ``loop.create_connection`` call, as the library made it."""

    host: Any
    port: Any
    sock: socket.socket | None
    sockname: Any
    transport: asyncio.Transport | None = None


def spy_on_connections() -> list[Connect]:
    """Record every ``create_connection`` call made on the running loop
    (passed on to the loop's own method: aiocoloc's, since it is installed)."""
    loop = asyncio.get_running_loop()
    routed = type(loop).create_connection
    calls: list[Connect] = []

    async def create_connection(
        protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        sock = kwargs.get("sock")
        call = Connect(host, port, sock, sock.getsockname() if sock is not None else None)
        calls.append(call)
        transport, protocol = await routed(loop, protocol_factory, host, port, **kwargs)
        call.transport = transport
        return transport, protocol

    loop.create_connection = create_connection  # type: ignore[method-assign, assignment]
    return calls


def on_shm(info: dict[str, Any] | None) -> bool:
    return info is not None and info["mode"] == "shm" and info["rx_mode"] == "shm"


def assert_upgraded_once(before: dict[str, Any]) -> None:
    after = aiocoloc.stats()
    assert after["upgrades"] == before["upgrades"] + 1
    assert after["fallbacks"] == before["fallbacks"], "a connection stayed on TCP"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- aiohttp ---------------------------------------------------------------------------


async def aiohttp_until_shm(
    session: aiohttp.ClientSession, connects: list[Connect]
) -> aiocoloc.SwitchableTransport:
    """GET /mode until both ends of the session's one (kept-alive) connection
    report shared memory in both directions; its client transport."""
    deadline = time.monotonic() + UPGRADE_DEADLINE
    while True:
        async with session.get("/mode") as response:
            assert response.status == 200
            server = (await response.json())["aiocoloc"]
        assert len(connects) == 1, "aiohttp opened more than one connection"
        transport = connects[0].transport
        assert isinstance(transport, aiocoloc.SwitchableTransport), transport
        client = transport.get_extra_info("aiocoloc")
        assert client["fallback_reason"] is None, client
        assert server is not None and server["fallback_reason"] is None, server
        if on_shm(client) and on_shm(server):
            return transport
        assert time.monotonic() < deadline, f"not on shared memory: {client}, server {server}"
        await asyncio.sleep(0.01)


async def download(session: aiohttp.ClientSession, size: int, seed: int) -> tuple[int, str]:
    """GET /stream: how many bytes came, and their sha256."""
    digest = hashlib.sha256()
    received = 0
    async with session.get("/stream", params={"size": size, "seed": seed}) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            digest.update(chunk)
            received += len(chunk)
    return received, digest.hexdigest()


async def upload(session: aiohttp.ClientSession, data: bytes, chunk: int) -> dict[str, Any]:
    """POST /upload, streamed in ``chunk``-byte pieces: the server's answer."""

    async def body() -> AsyncIterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(data), chunk):
            yield bytes(view[start : start + chunk])

    async with session.post("/upload", data=body()) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
    return answer


def test_aiohttp_server_and_client(loop_kind: str, colocated: None) -> None:
    down_size, up_size = 32 << 20, 24 << 20

    async def scenario(port: int) -> None:
        errors = watch_loop_errors()
        connects = spy_on_connections()
        before = aiocoloc.stats()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            transport = await aiohttp_until_shm(session, connects)
            for _ in range(5):  # more requests, on the one upgraded connection
                async with session.get("/mode") as response:
                    assert response.status == 200
                    assert on_shm((await response.json())["aiocoloc"])

            received, digest = await download(session, down_size, seed=7)
            assert received == down_size
            assert digest == sha256(pattern(7, down_size))

            data = pattern(8, up_size)
            answer = await upload(session, data, chunk=300_000)
            assert answer["size"] == up_size
            assert answer["sha256"] == sha256(data)
            assert on_shm(answer["aiocoloc"]), answer
            info = transport.get_extra_info("aiocoloc")
            assert on_shm(info), info
            assert info["switches"] == 1  # once to shared memory, never back
        assert len(connects) == 1, "aiohttp opened more than one connection"
        assert_upgraded_once(before)
        assert not errors, errors

    with peer(loop_kind, "aiohttp") as port:
        run(loop_kind, lambda: scenario(port))


def test_aiohttp_connector_hands_over_its_own_socket(loop_kind: str, colocated: None) -> None:
    """aiohttp connects the socket itself (happy eyeballs, here through our
    ``socket_factory``) and passes it as ``create_connection(sock=...)``."""

    async def scenario(port: int) -> None:
        errors = watch_loop_errors()
        connects = spy_on_connections()
        made: list[socket.socket] = []

        def socket_factory(addr_info: Any) -> socket.socket:
            family, type_, proto, _, _ = addr_info
            made.append(socket.socket(family, type_, proto))
            return made[-1]

        before = aiocoloc.stats()
        connector = aiohttp.TCPConnector(socket_factory=socket_factory)
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{port}", connector=connector
        ) as session:
            transport = await aiohttp_until_shm(session, connects)
            assert len(made) == 1
            call = connects[0]
            assert call.host is None and call.port is None
            assert call.sock is made[0]
            assert transport.get_extra_info("sockname") == call.sockname
            assert transport.get_extra_info("peername") == ("127.0.0.1", port)

            received, digest = await download(session, 4 << 20, seed=11)
            assert received == 4 << 20 and digest == sha256(pattern(11, 4 << 20))
            data = pattern(12, 4 << 20)
            answer = await upload(session, data, chunk=65536)
            assert (answer["size"], answer["sha256"]) == (len(data), sha256(data))
            assert on_shm(answer["aiocoloc"]), answer
        assert len(connects) == 1
        assert_upgraded_once(before)
        assert not errors, errors

    with peer(loop_kind, "aiohttp") as port:
        run(loop_kind, lambda: scenario(port))


# --- websockets ------------------------------------------------------------------------


async def websocket_until_shm(ws: ClientConnection) -> dict[str, Any]:
    """Ask the server for its mode until both ends are on shared memory."""
    deadline = time.monotonic() + UPGRADE_DEADLINE
    while True:
        await ws.send("mode?")
        reply = await ws.recv()
        assert isinstance(reply, str)
        server: dict[str, Any] | None = json.loads(reply)["aiocoloc"]
        client = ws.transport.get_extra_info("aiocoloc")
        assert client is not None and client["fallback_reason"] is None, client
        assert server is not None and server["fallback_reason"] is None, server
        if on_shm(client) and on_shm(server):
            return server
        assert time.monotonic() < deadline, f"not on shared memory: {client}, server {server}"
        await asyncio.sleep(0.01)


def test_websockets_echo(loop_kind: str, colocated: None) -> None:
    async def scenario(port: int) -> None:
        errors = watch_loop_errors()
        connects = spy_on_connections()
        before = aiocoloc.stats()
        async with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            assert isinstance(ws.transport, aiocoloc.SwitchableTransport), ws.transport
            await websocket_until_shm(ws)

            texts = ["hello", "", "héllo wörld ☃ " * 1000, "x" * 100_000]
            for text in texts:
                await ws.send(text)
            for text in texts:
                assert await ws.recv() == text

            for seed, size in ((21, 3 << 20), (22, 5 << 20 | 12345)):
                payload = pattern(seed, size)
                await ws.send(payload)
                echoed = await ws.recv()
                assert isinstance(echoed, bytes)
                assert len(echoed) == size and sha256(echoed) == sha256(payload)

            assert on_shm(await websocket_until_shm(ws))
            assert on_shm(ws.transport.get_extra_info("aiocoloc"))
        assert len(connects) == 1 and connects[0].transport is ws.transport
        assert_upgraded_once(before)
        assert not errors, errors

    with peer(loop_kind, "websockets") as port:
        run(loop_kind, lambda: scenario(port))
