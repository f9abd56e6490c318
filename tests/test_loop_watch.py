"""``SwitchableTransport.watch_loop``: a writer that never yields to the event
loop (``write(); await drain()`` on a transport that is not paused) is paused
briefly so that the loop runs, and a writer that yields is left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

import aiocoloc
from aiocoloc.transport import SwitchableTransport

from .test_transport import LOOPS, run

CHUNK = bytes(64)
#: Writes before a test gives up waiting for the loop to turn.
MAX_WRITES = 200_000


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(1 << 20):
        pass
    writer.close()


async def with_connection(
    body: Callable[[asyncio.StreamWriter, SwitchableTransport], Awaitable[None]],
) -> None:
    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="never")
    transport = writer.transport
    assert isinstance(transport, SwitchableTransport)
    try:
        await body(writer, transport)
    finally:
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def writes_until(writer: asyncio.StreamWriter, done: asyncio.Event) -> int:
    """Write 64 B chunks with write(); await drain() until ``done``: never yields
    by itself.  Returns the writes made."""
    for n in range(MAX_WRITES):
        if done.is_set():
            return n
        writer.write(CHUNK)
        await writer.drain()
    return MAX_WRITES


def test_a_watched_writer_lets_the_loop_run(loop_kind: str) -> None:
    async def body(writer: asyncio.StreamWriter, transport: SwitchableTransport) -> None:
        events: list[str] = []
        protocol = transport.get_protocol()
        for name in ("pause_writing", "resume_writing"):
            method = getattr(protocol, name)

            def spy(method: Callable[[], None] = method, name: str = name) -> None:
                events.append(name)
                method()

            setattr(protocol, name, spy)
        transport.watch_loop(0.001)
        ran = asyncio.Event()
        started = time.monotonic()
        asyncio.get_running_loop().call_soon(ran.set)
        writes = await writes_until(writer, ran)
        waited = time.monotonic() - started
        assert ran.is_set(), "the loop never ran while the writer wrote"
        assert waited < 0.1, waited
        assert transport.nudges >= 1
        assert writes > 0
        # Strictly paired, and the protocol is left writable.
        assert events[::2] == ["pause_writing"] * len(events[::2])
        assert events[1::2] == ["resume_writing"] * len(events[1::2])
        await asyncio.sleep(0.01)
        assert events[-1] == "resume_writing"

    run(loop_kind, lambda: with_connection(body))


def test_an_unwatched_writer_is_never_paused(loop_kind: str) -> None:
    async def body(writer: asyncio.StreamWriter, transport: SwitchableTransport) -> None:
        ran = asyncio.Event()
        asyncio.get_running_loop().call_soon(ran.set)
        transport.watch_loop(0.001)
        transport.watch_loop(None)  # stopped again: the TCP path as plain asyncio's
        writes = await writes_until(writer, ran)
        # The loop turns only when the socket buffer fills (a real pause).
        assert transport.nudges == 0
        assert writes > 100

    run(loop_kind, lambda: with_connection(body))


def test_a_writer_that_yields_is_never_paused(loop_kind: str) -> None:
    async def body(writer: asyncio.StreamWriter, transport: SwitchableTransport) -> None:
        transport.watch_loop(0.001)
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:
            for _ in range(16):
                writer.write(CHUNK)
                await writer.drain()
            await asyncio.sleep(0)
        assert transport.nudges == 0

    run(loop_kind, lambda: with_connection(body))


def test_the_upgrade_task_runs_while_the_writer_never_yields(loop_kind: str) -> None:
    """In one process: the default policy's threshold is reached by a writer
    that never yields, and the connection still upgrades."""

    async def scenario() -> None:
        server = await aiocoloc.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await aiocoloc.open_connection("127.0.0.1", port)
        done = asyncio.Event()
        written = 0
        for _ in range(MAX_WRITES):
            writer.write(CHUNK)
            await writer.drain()
            written += len(CHUNK)
            if writer.transport.get_extra_info("aiocoloc")["mode"] == "shm":
                done.set()
                break
        assert done.is_set(), writer.transport.get_extra_info("aiocoloc")
        assert written < aiocoloc.connect.policy.AUTO_UPGRADE_AFTER + (1 << 20)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario)
