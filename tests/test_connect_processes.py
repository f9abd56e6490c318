"""The connection API between two real processes: upgrade, bytes intact both
ways, and a peer killed with SIGKILL after the upgrade."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

import aiocoloc
from aiocoloc.connect.colocation import local_pools

from .peers import finish, line, spawn
from .test_connect import info, until, upgraded
from .test_transport import LOOPS, run

PEER = Path(__file__).with_name("connect_peer.py")


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_client_upgrades_to_a_server_process_and_survives_its_death(loop_kind: str) -> None:
    async def scenario() -> None:
        child = spawn(PEER, "server", loop_kind)
        try:
            port = int(await line(child))
            reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            await upgraded(writer)
            assert json.loads(await line(child)) == {"upgraded": True}
            payload = os.urandom(8 << 20)
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            assert info(writer)["pool"] in local_pools().in_use()

            writer.write(os.urandom(1 << 20))
            child.kill()
            killed = time.monotonic()
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await reader.readexactly(64 << 20)
            assert time.monotonic() - killed < 1.0
            writer.close()
            await until(lambda: local_pools().in_use() == {}, "the pool to be released")
        finally:
            finish(child)

    run(loop_kind, scenario)


def test_server_gives_pipes_back_when_a_client_process_dies(loop_kind: str) -> None:
    async def scenario() -> None:
        lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                lost.set_result(None)
            except ConnectionError as exc:
                lost.set_result(exc)
            finally:
                writer.close()

        server = await aiocoloc.start_server(handle, "127.0.0.1", 0, upgrade="always")
        async with server:
            port = server.sockets[0].getsockname()[1]
            child = spawn(PEER, "client", loop_kind, str(port))
            try:
                assert json.loads(await line(child)) == {"upgraded": True}
                pools = local_pools().in_use()
                assert len(pools) == 1
                pool_id = next(iter(pools))
                pool = local_pools().get(pool_id)
                assert pool is not None and pool.stats()["pipes"] == 2
                child.kill()
                killed = time.monotonic()
                assert isinstance(await asyncio.wait_for(lost, 2), ConnectionResetError)
                assert time.monotonic() - killed < 0.5
                await until(lambda: pool.stats()["pipes"] == 0, "the pipes to come back")
                assert local_pools().in_use() == {pool_id: 1}  # the server's own reference
            finally:
                finish(child)

    run(loop_kind, scenario)


def test_later_connections_skip_the_pool_exchange(
    loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first connection to a server process maps its pool (pool, join);
    the next ones offer that pool in their hello and go straight to pipes."""
    from aiocoloc.control import ControlChannel, Message
    from aiocoloc.control.messages import Hello

    sent: list[list[str]] = []
    original = ControlChannel.send

    async def spy(self: ControlChannel, message: Message, fds: Any = ()) -> None:
        offer = isinstance(message, Hello) and message.pool is not None
        sent[-1].append(message.OP + ("+offer" if offer else ""))
        await original(self, message, fds)

    monkeypatch.setattr(ControlChannel, "send", spy)

    async def scenario() -> None:
        child = spawn(PEER, "server", loop_kind)
        try:
            port = int(await line(child))
            for _ in range(3):
                sent.append([])
                reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
                await upgraded(writer)
                assert json.loads(await line(child)) == {"upgraded": True}
                payload = os.urandom(1 << 20)
                writer.write(payload)
                assert await reader.readexactly(len(payload)) == payload
                writer.close()
                await writer.wait_closed()
        finally:
            finish(child)

    run(loop_kind, scenario)
    assert sent == [["hello", "join", "proof"]] + [["hello+offer", "proof"]] * 2
