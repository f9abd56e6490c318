"""TLS over the transport: ``loop.start_tls`` on a connected pair, and
``ssl=`` on the entry points -- handshake timeouts, data right after the
handshake, shutdown while reading is paused, an abandoned TLS connect."""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
import warnings
from typing import Any

import pytest
import trustme

from . import impls
from .impls import Impl, Recorder

_CA = trustme.CA()
_CERT = _CA.issue_cert("localhost")


def server_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _CERT.configure_cert(ctx)
    return ctx


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    _CA.configure_trust(ctx)
    return ctx


class Greeter(Recorder):
    """Writes a greeting from connection_made: right after the handshake."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.write(b"hello")  # type: ignore[attr-defined]


class TLSPairTests(Impl):
    def test_start_tls_both_ends(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            loop = asyncio.get_running_loop()
            client_app, server_app = Recorder(), Greeter()
            client, server = await asyncio.gather(
                loop.start_tls(
                    conn.client, client_app, client_context(), server_hostname="localhost"
                ),
                loop.start_tls(conn.server, server_app, server_context(), server_side=True),
            )
            assert client is not None and server is not None
            server_app.connection_made(server)  # start_tls does not call it
            client_app.connection_made(client)
            await client_app.wait_for_bytes(5)
            assert bytes(client_app.data) == b"hello"
            assert client.get_extra_info("peercert") is not None
            client.close()
            await server_app.eof
            server.close()
            assert await client_app.lost is None
            await server_app.lost
            await conn.aclose()

        self.run(scenario)

    def test_start_tls_handshake_timeout(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()  # the server never answers the hello
            await conn.midway()
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            with pytest.raises(ConnectionAbortedError, match="SSL handshake is taking longer"):
                await loop.start_tls(
                    conn.client,
                    Recorder(),
                    client_context(),
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.2,
                )
            assert time.monotonic() - started < 3
            assert conn.client.is_closing()
            await conn.aclose()

        self.run(scenario)


class TLSServerTests(Impl):
    async def tls_server(self, factory: Any = Recorder, **kw: Any) -> tuple[Any, int]:
        server = await self.create_server(factory, "127.0.0.1", 0, ssl=server_context(), **kw)
        return server, server.sockets[0].getsockname()[1]

    async def silent_server(self) -> tuple[Silent, int]:
        """A plain TCP server that never answers a TLS hello."""
        silent = Silent()
        silent.server = await asyncio.get_running_loop().create_server(
            silent.accept, "127.0.0.1", 0
        )
        return silent, silent.server.sockets[0].getsockname()[1]

    def test_client_handshake_timeout(self) -> None:
        async def scenario() -> None:
            server, port = await self.silent_server()
            started = time.monotonic()
            with pytest.raises(ConnectionAbortedError, match="SSL handshake is taking longer"):
                await self.create_connection(
                    Recorder,
                    "127.0.0.1",
                    port,
                    ssl=client_context(),
                    server_hostname="localhost",
                    ssl_handshake_timeout=0.2,
                )
            assert time.monotonic() - started < 3
            await server.aclose()

        self.run(scenario)

    def test_server_handshake_timeout(self) -> None:
        async def scenario() -> None:
            server, port = await self.tls_server(ssl_handshake_timeout=0.2)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # no hello
            started = time.monotonic()
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass  # aborted: a reset is as good as an EOF here
            assert time.monotonic() - started < 3
            writer.close()
            server.close()
            await server.wait_closed()

        self.run(scenario)

    def test_data_right_after_the_handshake(self) -> None:
        async def scenario() -> None:
            server, port = await self.tls_server(Greeter)
            transport, protocol = await self.create_connection(
                Greeter, "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            await protocol.wait_for_bytes(5)
            assert bytes(protocol.data) == b"hello"
            transport.close()
            assert await protocol.lost is None
            server.close()
            await server.wait_closed()

        self.run(scenario)

    def test_shutdown_while_reading_is_paused(self) -> None:
        async def scenario() -> None:
            server, port = await self.tls_server(Greeter)
            transport, protocol = await self.create_connection(
                Recorder, "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            await protocol.wait_for_bytes(5)
            transport.pause_reading()
            transport.write(b"bye")
            transport.close()
            started = time.monotonic()
            assert await protocol.lost is None
            assert time.monotonic() - started < 3
            server.close()
            await server.wait_closed()

        self.run(scenario)

    def test_abandoned_tls_connect_leaves_no_resource_warning(self) -> None:
        async def scenario() -> None:
            server, port = await self.silent_server()
            connect = asyncio.ensure_future(
                self.create_connection(
                    Recorder, "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
                )
            )
            await asyncio.sleep(0.1)
            connect.cancel()
            with pytest.raises(asyncio.CancelledError):
                await connect
            del connect
            await server.aclose()
            await asyncio.sleep(0.05)

        gc.collect()  # earlier tests' garbage is not this test's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            self.run(scenario)
            gc.collect()
        leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaks, [str(w.message) for w in leaks]


class Silent:
    """The server's side of ``silent_server``: accepts, never answers."""

    server: asyncio.AbstractServer

    def __init__(self) -> None:
        self.accepted: list[Recorder] = []

    def accept(self) -> Recorder:
        self.accepted.append(Recorder())
        return self.accepted[-1]

    async def aclose(self) -> None:
        self.server.close()
        for protocol in self.accepted:
            protocol.transport.close()
            await protocol.lost
        await self.server.wait_closed()


class TestAsyncioTCP(TLSPairTests, TLSServerTests, impls.AsyncioTCP):
    pass


class TestUvloopTCP(TLSPairTests, TLSServerTests, impls.UvloopTCP):
    pass


class TestColocAsyncioTCP(TLSPairTests, TLSServerTests, impls.ColocAsyncioTCP):
    pass


class TestColocAsyncioSHM(TLSPairTests, TLSServerTests, impls.ColocAsyncioSHM):
    pass


class TestColocAsyncioSwitched(TLSPairTests, TLSServerTests, impls.ColocAsyncioSwitched):
    pass


class TestColocUvloopTCP(TLSPairTests, TLSServerTests, impls.ColocUvloopTCP):
    pass


class TestColocUvloopSHM(TLSPairTests, TLSServerTests, impls.ColocUvloopSHM):
    pass


class TestColocUvloopSwitched(TLSPairTests, TLSServerTests, impls.ColocUvloopSwitched):
    pass
