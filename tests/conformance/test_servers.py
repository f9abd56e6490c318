"""Servers and streams through the entry points a user calls: a server the
caller dropped keeps serving, and a writer looping ``write``/``drain`` to a
peer that closed or reset gets the error at once (issue 10, point 2)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any

import pytest

from . import impls
from .impls import Impl, Recorder, reset

#: How soon the writer must see the error (asyncio takes milliseconds).
ERROR_BOUND = 2.0


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class ServerTests(Impl):
    async def round_trip(self, port: int) -> None:
        transport, protocol = await self.create_connection(Recorder, "127.0.0.1", port)
        transport.write(b"ping")
        await protocol.wait_for_bytes(4)
        assert bytes(protocol.data) == b"ping"
        transport.close()
        await protocol.lost

    def test_dropped_server_keeps_serving(self) -> None:
        async def scenario() -> None:
            server = await self.create_server(Echo, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            ref = weakref.ref(server)
            del server
            gc.collect()
            kept = ref()
            assert kept is not None, "the loop let a serving server go"
            assert kept.is_serving()
            await self.round_trip(port)
            kept.close()
            await kept.wait_closed()

        self.run(scenario)

    def test_dropped_stream_server_keeps_serving(self) -> None:
        async def scenario() -> None:
            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(await reader.read(100))
                await writer.drain()
                writer.close()

            server = await self.start_server(echo, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            ref = weakref.ref(server)
            del server
            gc.collect()
            kept = ref()
            assert kept is not None, "the loop let a serving server go"
            reader, writer = await self.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.read(100) == b"ping"
            writer.close()
            await writer.wait_closed()
            kept.close()
            await kept.wait_closed()

        self.run(scenario)

    @pytest.mark.parametrize("peer", ["closes", "resets"])
    def test_write_drain_loop_gets_the_error(self, peer: str) -> None:
        """The peer accepts and closes at once; the writer loops write/drain
        without ever yielding otherwise: it must get an error, promptly."""

        async def scenario() -> None:
            async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                if peer == "resets":
                    reset(writer.transport)
                else:
                    writer.close()

            server = await self.start_server(hang_up, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            _, writer = await self.open_connection("127.0.0.1", port)
            await asyncio.sleep(0.1)  # the server has hung up before we write
            started = time.monotonic()
            with pytest.raises(self.writer_errors()):
                while time.monotonic() - started < ERROR_BOUND:
                    writer.write(b"x" * 1000)
                    await writer.drain()
            assert time.monotonic() - started < ERROR_BOUND
            assert writer.transport.is_closing()
            writer.close()
            server.close()
            await server.wait_closed()

        # (The write loop bounds itself by the clock: a writer that never
        # yields could not be cancelled by the scenario's timeout.)
        self.run(scenario)

    def test_write_drain_loop_through_create_connection(self) -> None:
        """The same through create_connection and a StreamWriter over it."""

        async def scenario() -> None:
            accepted: list[Recorder] = []

            def serve() -> Recorder:
                accepted.append(Recorder())
                return accepted[-1]

            server = await self.create_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            transport, protocol = await self.create_connection(
                lambda: asyncio.StreamReaderProtocol(reader), "127.0.0.1", port
            )
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            async with asyncio.timeout(5):
                while not accepted:
                    await asyncio.sleep(0.001)
            await accepted[0].made
            reset(accepted[0].transport)  # the server's side of our connection goes
            await asyncio.sleep(0.1)
            started = time.monotonic()
            with pytest.raises(self.writer_errors()):
                while time.monotonic() - started < ERROR_BOUND:
                    writer.write(b"x" * 1000)
                    await writer.drain()
            assert time.monotonic() - started < ERROR_BOUND
            writer.close()
            server.close()
            await server.wait_closed()

        self.run(scenario)

    def writer_errors(self) -> tuple[type[BaseException], ...]:
        # uvloop's transport raises RuntimeError from write() once its
        # handle is closed (asyncio's drop the write): drain() may not get
        # to raise first.
        if self.uvloop:
            return (ConnectionError, RuntimeError)
        return (ConnectionError,)


class TestAsyncioTCP(ServerTests, impls.AsyncioTCP):
    pass


class TestUvloopTCP(ServerTests, impls.UvloopTCP):
    pass


class TestColocAsyncioTCP(ServerTests, impls.ColocAsyncioTCP):
    pass


class TestColocAsyncioSHM(ServerTests, impls.ColocAsyncioSHM):
    pass


class TestColocAsyncioSwitched(ServerTests, impls.ColocAsyncioSwitched):
    pass


class TestColocUvloopTCP(ServerTests, impls.ColocUvloopTCP):
    pass


class TestColocUvloopSHM(ServerTests, impls.ColocUvloopSHM):
    pass


class TestColocUvloopSwitched(ServerTests, impls.ColocUvloopSwitched):
    pass
