"""Two connected ``SwitchableTransport``s in one event loop, for the transport
tests: a real loopback TCP connection, and (optionally) a real pool with two
pipes, eventfd doorbells and a control channel over a Unix socket pair.
Connection set-up between processes comes with the handshake (later issue)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.shm import MemfdSegment, Pool, PoolConfig
from aiocoloc.shm.elastic import ElasticConfig
from aiocoloc.transport import SwitchableTransport, attach_shared_memory, open_transport

POOL_CONFIG = PoolConfig(slice_size=16384, max_pipes=8, max_slices_per_pipe=64, lease=60)


@dataclass
class Pair:
    client: SwitchableTransport
    client_protocol: Any
    server: SwitchableTransport
    server_protocol: Any
    pool: Pool | None


def tcp_socket_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


async def make_pair(
    client_factory: Callable[[], asyncio.BaseProtocol],
    server_factory: Callable[[], asyncio.BaseProtocol],
    *,
    shm: bool = True,
    pipe_slices: int = 4,
    socket_bell: bool = False,
    elastic: ElasticConfig | None = ElasticConfig(),  # noqa: B008 - frozen
) -> Pair:
    """``socket_bell``: doorbells as control-channel messages (as across VMs)."""
    loop = asyncio.get_running_loop()
    csock, ssock = tcp_socket_pair()
    client, cproto = await open_transport(loop, client_factory, csock)
    server, sproto = await open_transport(loop, server_factory, ssock)
    pool = None
    if shm:
        pool = Pool.create(MemfdSegment.create(4 << 20), POOL_CONFIG)
        up = pool.create_pipe(pool.slot, pool.slot, initial=pipe_slices)
        down = pool.create_pipe(pool.slot, pool.slot, initial=pipe_slices)
        client_bell, server_bell = new_eventfd(), new_eventfd()
        ca, sa = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for transport, send, receive, listen, ring, sock in (
            (client, up, down, client_bell, server_bell, ca),
            (server, down, up, server_bell, client_bell, sa),
        ):
            attach_shared_memory(
                transport,
                pool,
                send=send,
                receive=receive,
                listen_fd=os.dup(listen),
                ring_fd=os.dup(ring),
                control=sock,
                socket_bell=socket_bell,
                elastic=elastic,
            )
        os.close(client_bell)
        os.close(server_bell)
    return Pair(client, cproto, server, sproto, pool)


class Recorder(asyncio.Protocol):
    """Records every callback in order, and the bytes received."""

    def __init__(self, keep_open_on_eof: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.events: list[str] = []
        self.data = bytearray()
        self.keep_open_on_eof = keep_open_on_eof
        self.made: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.transport: Any = None
        self.received = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        self.data += data
        self.received.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.eof.set_result(None)
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)

    async def wait_for_bytes(self, n: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while len(self.data) < n:
                self.received.clear()
                await self.received.wait()


class BufferedRecorder(asyncio.BufferedProtocol):
    """Reads into a small buffer of its own."""

    def __init__(self, size: int = 1000) -> None:
        loop = asyncio.get_running_loop()
        self.buffer = bytearray(size)
        self.data = bytearray()
        self.updates = 0
        self.events: list[str] = []
        self.made: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(None)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.updates += 1
        self.data += self.buffer[:nbytes]

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)
