"""Protocols: ``BufferedProtocol`` and look-alikes, protocols that raise in
each callback, ``set_protocol``, and ``get_extra_info``."""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any

import pytest

from ..transport_pair import BufferedRecorder
from . import impls
from .impls import Impl, Recorder


class LookAlike:
    """get_buffer()/buffer_updated() without subclassing BufferedProtocol
    (nor asyncio.Protocol), and no data_received."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.buffer = bytearray(100)
        self.data = bytearray()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Boom(Exception):
    pass


def raising(base: type, callback: str) -> type:
    """A protocol class whose ``callback`` raises ``Boom``."""

    def fail(self: Any, *args: Any) -> Any:
        getattr(base, callback)(self, *args)  # record it first
        raise Boom(callback)

    return type(f"Raising_{callback}", (base,), {callback: fail})


# What the loop's own transport does when a callback raises: whether the
# connection is lost (and with what), and what the exception handler hears.
FATAL = "fatal"  # connection_lost(Boom), one report carrying Boom
REPORTED = "reported"  # one report carrying Boom, the connection stays open
CALLBACKS = [
    "data_received",
    "eof_received",
    "get_buffer",
    "buffer_updated",
    "pause_writing",
    "resume_writing",
]


class ProtocolTests(Impl):
    def test_buffered_protocol(self) -> None:
        async def scenario() -> None:
            conn = await self.connect(server=BufferedRecorder)
            payload = random.Random(1).randbytes(300_000)
            conn.client.write(payload[:100_000])
            await conn.midway()
            conn.client.write(payload[100_000:])
            conn.client.write_eof()
            await conn.server_protocol.eof
            assert conn.server_protocol.data == payload
            assert conn.server_protocol.updates >= 300  # 1000-byte buffer
            await conn.aclose()

        self.run(scenario)

    def test_buffered_look_alike(self) -> None:
        """uvloop reads into any protocol with get_buffer() that is not an
        asyncio.Protocol; asyncio calls its (missing) data_received."""

        async def scenario() -> None:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(c))
            conn = await self.connect(server=LookAlike)  # type: ignore[arg-type]
            conn.client.write(b"hello")
            if self.uvloop:
                async with asyncio.timeout(5):
                    while len(conn.server_protocol.data) < 5:
                        await asyncio.sleep(0.005)
                assert bytes(conn.server_protocol.data) == b"hello"
                assert not errors
            else:
                exc = await conn.server_protocol.lost
                assert type(exc) is AttributeError and "data_received" in str(exc)
                assert [e["exception"] for e in errors] == [exc]
            await conn.aclose()

        self.run(scenario)

    @pytest.mark.parametrize("callback", CALLBACKS)
    def test_callback_raises(self, callback: str) -> None:
        async def scenario() -> None:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(c))
            base = BufferedRecorder if callback in ("get_buffer", "buffer_updated") else Recorder
            if callback in ("pause_writing", "resume_writing"):
                conn = await self.connect(client=raising(Recorder, callback))
                await conn.midway()
                conn.server.pause_reading()
                conn.client.write(bytes(8 << 20))  # over the high-water mark at once
                victim, protocol = conn.client, conn.client_protocol
                if callback == "resume_writing":
                    conn.server.resume_reading()
                    async with asyncio.timeout(10):
                        while "resume" not in protocol.events:
                            await asyncio.sleep(0.005)
            else:
                conn = await self.connect(server=raising(base, callback))
                await conn.midway()
                conn.client.write(b"x")
                if callback == "eof_received":
                    conn.client.write_eof()
                victim, protocol = conn.server, conn.server_protocol
            outcome = await outcome_of(protocol, errors)
            expected = self.when_raising(callback)
            assert outcome["kind"] == expected, outcome
            if expected == FATAL:
                assert victim.is_closing()
                if callback == "get_buffer" and self.uvloop:
                    # uvloop reports its own error in place of the protocol's.
                    assert type(outcome["lost"]) is RuntimeError
                    assert "get_buffer()" in str(outcome["lost"])
                else:
                    assert type(outcome["lost"]) is Boom
                    assert outcome["reported"] == [outcome["lost"]]
                message = errors[0]["message"]
                if self.uvloop:  # uvloop's words, naming the transport's class
                    assert message.startswith("Fatal error on transport ")
                else:
                    assert message == f"Fatal error: protocol.{callback}() call failed."
            else:
                assert not victim.is_closing()
                assert [type(e) for e in outcome["reported"]] == [Boom]
            await conn.aclose()

        self.run(scenario)

    def when_raising(self, callback: str) -> str:
        """What the loop's own transport does when ``callback`` raises."""
        return REPORTED if callback in ("pause_writing", "resume_writing") else FATAL

    def test_connection_made_raises(self) -> None:
        """The loop reports it (it calls it from a callback of its own); the
        connection stays open.  uvloop starts reading only after it returned:
        nothing is read, ever; asyncio's reads on."""

        async def scenario() -> None:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(c))
            conn = await self.connect(server=raising(Recorder, "connection_made"))
            await conn.midway()
            conn.client.write(b"x")
            await asyncio.sleep(0.05)
            assert [type(e.get("exception")) for e in errors] == [Boom]
            assert not conn.server.is_closing()
            assert bytes(conn.server_protocol.data) == (b"" if self.uvloop else b"x")
            assert conn.server.is_reading() is not self.uvloop
            conn.server.write(b"y")  # writing works
            await conn.client_protocol.wait_for_bytes(1)
            await conn.aclose()

        self.run(scenario)

    def test_connection_lost_raises(self) -> None:
        """The loop reports it (as any failing callback); nothing more happens."""

        async def scenario() -> None:
            errors: list[dict[str, Any]] = []
            asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(c))
            conn = await self.connect(server=raising(Recorder, "connection_lost"))
            await conn.midway()
            conn.server.close()
            await conn.server_protocol.lost
            await asyncio.sleep(0.02)
            assert [type(e.get("exception")) for e in errors] == [Boom]
            assert conn.server_protocol.events.count("lost") == 1
            await conn.aclose()

        self.run(scenario)

    def test_set_protocol_mid_stream(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            conn.client.write(b"A" * 5000)
            await conn.server_protocol.wait_for_bytes(5000)
            await conn.midway()
            second = BufferedRecorder(777)
            conn.server.set_protocol(second)
            assert conn.server.get_protocol() is second
            conn.client.write(b"B" * 5000)
            conn.client.write_eof()
            await second.eof
            assert bytes(conn.server_protocol.data) == b"A" * 5000
            assert bytes(second.data) == b"B" * 5000
            conn.server.close()
            assert await second.lost is None
            await conn.aclose()

        self.run(scenario)

    def test_extra_info(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            t = conn.client
            peer = t.get_extra_info("peername")
            assert peer == conn.server.get_extra_info("sockname")
            assert peer[0] == "127.0.0.1"
            sock = t.get_extra_info("socket")
            # asyncio hands out a TransportSocket, uvloop a pseudo-socket.
            assert type(sock).__name__ == ("PseudoSocket" if self.uvloop else "TransportSocket")
            assert sock.getpeername() == peer
            assert sock.family == socket.AF_INET
            assert t.get_extra_info("no-such-key", 42) == 42
            assert t.get_extra_info("no-such-key") is None
            conn.client.close()
            await conn.client_protocol.lost
            assert t.get_extra_info("peername") == peer
            assert t.get_extra_info("socket") is not None
            await conn.aclose()

        self.run(scenario)


async def outcome_of(protocol: Any, errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Wait for connection_lost (or a little while), then say what happened."""
    try:
        async with asyncio.timeout(0.2):
            lost = await protocol.lost
    except TimeoutError:
        return {
            "kind": REPORTED if errors else "nothing",
            "reported": [e.get("exception") for e in errors],
        }
    await asyncio.sleep(0.01)
    return {"kind": FATAL, "lost": lost, "reported": [e.get("exception") for e in errors]}


class TestAsyncioTCP(ProtocolTests, impls.AsyncioTCP):
    pass


class TestUvloopTCP(ProtocolTests, impls.UvloopTCP):
    pass


class TestColocAsyncioTCP(ProtocolTests, impls.ColocAsyncioTCP):
    pass


class TestColocAsyncioSHM(ProtocolTests, impls.ColocAsyncioSHM):
    pass


class TestColocAsyncioSwitched(ProtocolTests, impls.ColocAsyncioSwitched):
    pass


class TestColocUvloopTCP(ProtocolTests, impls.ColocUvloopTCP):
    pass


class TestColocUvloopSHM(ProtocolTests, impls.ColocUvloopSHM):
    pass


class TestColocUvloopSwitched(ProtocolTests, impls.ColocUvloopSwitched):
    pass
