"""Every transport method in every state of a connection's life: open,
paused reading, EOF written, EOF received, closing, closed, aborted, peer
reset, peer gone mid-write -- and ``is_closing()`` along the way."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from . import impls
from .impls import NOTICES_RESET_WHILE_PAUSED, Impl, Recorder, reset


def probe(transport: Any) -> dict[str, Any]:
    """What every query method says."""
    return {
        "is_closing": transport.is_closing(),
        "is_reading": transport.is_reading(),
        "can_write_eof": transport.can_write_eof(),
        "limits": transport.get_write_buffer_limits(),
        "buffer": transport.get_write_buffer_size(),
    }


def calls(transport: Any) -> dict[str, str]:
    """Call each mutator once; what it raised (by type), or "ok"."""
    outcome = {}
    for name, call in (
        ("pause_reading", transport.pause_reading),
        ("resume_reading", transport.resume_reading),
        ("set_write_buffer_limits", lambda: transport.set_write_buffer_limits(100, 10)),
        ("write", lambda: transport.write(b"x")),
        ("writelines", lambda: transport.writelines([b"x"])),
        ("write_eof", transport.write_eof),
        ("close", transport.close),
        ("abort", transport.abort),
    ):
        try:
            call()
            outcome[name] = "ok"
        except Exception as exc:
            outcome[name] = type(exc).__name__
    return outcome


#: States a live connection can be in, for the method matrix.
LIVE_STATES = ["open", "paused_reading", "eof_written", "eof_received"]


class LifecycleTests(Impl):
    @pytest.mark.parametrize("state", LIVE_STATES)
    def test_every_method_in_a_live_state(self, state: str) -> None:
        """Queries, then each method once (close last), in each live state."""

        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            t, protocol = conn.client, conn.client_protocol
            if state == "paused_reading":
                t.pause_reading()
            elif state == "eof_written":
                t.write_eof()
            elif state == "eof_received":
                conn.server.write_eof()
                await protocol.eof
            reading = {
                "open": True,
                "paused_reading": False,
                "eof_written": True,
                # uvloop stops reading at EOF (libuv does); asyncio's reads on.
                "eof_received": not self.uvloop,
            }[state]
            assert probe(t) == {
                "is_closing": False,
                "is_reading": reading,
                "can_write_eof": True,
                "limits": self.default_limits,
                "buffer": 0,
            }
            assert t.get_protocol() is protocol
            t.set_protocol(protocol)
            assert t.get_extra_info("peername") == conn.server.get_extra_info("sockname")
            outcome = calls(t)
            expected = dict.fromkeys(outcome, "ok")
            if state == "eof_written":
                expected.update(write="RuntimeError", writelines="RuntimeError")
            assert outcome == expected
            assert await protocol.lost is None  # close() and abort() came last
            assert protocol.events.count("lost") == 1
            received = bytes(conn.server_protocol.data)
            assert received in (b"", b"x", b"xx")  # what got out before abort()
            await conn.aclose()

        self.run(scenario)

    def test_open(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            t = conn.client
            assert probe(t) == {
                "is_closing": False,
                "is_reading": True,
                "can_write_eof": True,
                "limits": self.default_limits,
                "buffer": 0,
            }
            assert t.get_protocol() is conn.client_protocol
            t.write(b"ab")
            await conn.midway()
            t.writelines([b"c", bytearray(b"d"), memoryview(b"e")])
            await conn.server_protocol.wait_for_bytes(5)
            assert bytes(conn.server_protocol.data) == b"abcde"
            await conn.aclose()

        self.run(scenario)

    def test_paused_reading_is_idempotent(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            conn.client.write(b"1")
            await conn.server_protocol.wait_for_bytes(1)
            await conn.midway()
            conn.server.pause_reading()
            conn.server.pause_reading()
            assert not conn.server.is_reading()
            assert not conn.server.is_closing()
            conn.client.write(b"2")
            await asyncio.sleep(0.05)
            assert bytes(conn.server_protocol.data) == b"1", "delivered while paused"
            assert conn.server.get_write_buffer_size() == 0
            conn.server.write(b"w")  # writing goes on while reading is paused
            await conn.client_protocol.wait_for_bytes(1)
            conn.server.resume_reading()
            conn.server.resume_reading()
            assert conn.server.is_reading()
            await conn.server_protocol.wait_for_bytes(2)
            assert bytes(conn.server_protocol.data) == b"12"
            await conn.aclose()

        self.run(scenario)

    def test_eof_while_paused_waits_for_resume(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.server.pause_reading()
            conn.client.write(b"last words")
            conn.client.write_eof()
            await asyncio.sleep(0.05)
            assert conn.server_protocol.events == ["made"]
            conn.server.resume_reading()
            await conn.server_protocol.eof
            assert conn.server_protocol.events == ["made", "data", "eof"]
            assert bytes(conn.server_protocol.data) == b"last words"
            await conn.aclose()

        self.run(scenario)

    def test_eof_written(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.client.write(b"q")
            conn.client.write_eof()
            conn.client.write_eof()  # idempotent
            assert not conn.client.is_closing()
            with pytest.raises(RuntimeError, match=r"Cannot call write\(\) after write_eof\(\)"):
                conn.client.write(b"more")
            with pytest.raises(RuntimeError, match="after write_eof"):
                conn.client.write(b"")  # even with nothing to write
            await conn.server_protocol.eof
            assert bytes(conn.server_protocol.data) == b"q"
            conn.server.write(b"answer")  # the other direction stays open
            await conn.client_protocol.wait_for_bytes(6)
            assert conn.client.is_reading()
            await conn.aclose()

        self.run(scenario)

    def test_eof_received_kept_open(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.client.write_eof()
            await conn.server_protocol.eof
            assert not conn.server.is_closing()
            # uvloop stops reading at EOF (libuv does); asyncio's says it reads on.
            assert conn.server.is_reading() is not self.uvloop
            conn.server.write(b"late")
            await conn.client_protocol.wait_for_bytes(4)
            conn.server.close()
            assert await conn.server_protocol.lost is None
            assert conn.server_protocol.events == ["made", "eof", "lost"]
            await conn.aclose()

        self.run(scenario)

    def test_eof_received_closes(self) -> None:
        async def scenario() -> None:
            conn = await self.connect(server=lambda: Recorder(keep_open_on_eof=False))
            await conn.midway()
            conn.client.write(b"x")
            conn.client.write_eof()
            await conn.server_protocol.eof
            assert conn.server.is_closing()
            assert not conn.server.is_reading()
            assert await conn.server_protocol.lost is None
            assert conn.server_protocol.events == ["made", "data", "eof", "lost"]
            # The client sees the server's close as EOF, then closes too.
            await conn.client_protocol.eof
            conn.client.close()
            assert await conn.client_protocol.lost is None
            await conn.aclose()

        self.run(scenario)

    def test_closing_then_closed(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            t = conn.client
            t.close()
            closing = probe(t)
            closing_calls = calls(t)
            assert not conn.client_protocol.lost.done()  # connection_lost comes later
            assert await conn.client_protocol.lost is None
            closed = probe(t)
            closed_calls = calls(t)
            await asyncio.sleep(0.01)
            assert conn.client_protocol.events.count("lost") == 1
            expected = {"is_closing": True, "is_reading": False, "can_write_eof": True}
            assert {k: closing[k] for k in expected} == expected
            assert {k: closed[k] for k in expected} == expected
            assert closing["limits"] == self.default_limits
            assert closed["limits"] == (10, 100)  # set by calls() while closing
            assert closing_calls == dict.fromkeys(closing_calls, "ok")
            assert closed_calls == self.closed_calls()
            assert t.get_extra_info("peername") is not None
            await conn.aclose()

        self.run(scenario)

    def closed_calls(self) -> dict[str, str]:
        """What ``calls()`` meets once connection_lost came."""
        ok = dict.fromkeys(
            (
                "pause_reading",
                "resume_reading",
                "set_write_buffer_limits",
                "write",
                "writelines",
                "write_eof",
                "close",
                "abort",
            ),
            "ok",
        )
        if self.uvloop:
            # uvloop's transport refuses writes and limits once its handle
            # is closed; asyncio's drops writes (with a warning, later).
            refused = ("write", "writelines", "write_eof", "set_write_buffer_limits")
            ok.update(dict.fromkeys(refused, "RuntimeError"))
        return ok

    def test_aborted_with_data_buffered(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.server.pause_reading()
            conn.client.set_write_buffer_limits(high=1 << 30)
            conn.client.write(bytes(8 << 20))
            assert conn.client.get_write_buffer_size() > 0
            conn.client.abort()
            assert conn.client.is_closing()
            size = conn.client.get_write_buffer_size()
            if self.uvloop and not self.differs("abort-empties-buffer"):
                assert size > 0  # uvloop's keeps counting what it will never send
            else:
                assert size == 0
            assert await conn.client_protocol.lost is None
            conn.client.abort()
            conn.client.close()
            await asyncio.sleep(0.01)
            assert conn.client_protocol.events.count("lost") == 1
            assert len(conn.server_protocol.data) < 8 << 20
            await conn.aclose()

        self.run(scenario)

    def test_peer_reset(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            conn.client.write(b"x")
            await conn.server_protocol.wait_for_bytes(1)
            await conn.midway()
            reset(conn.server)
            exc = await conn.client_protocol.lost
            assert type(exc) is ConnectionResetError
            assert conn.client.is_closing()
            assert not conn.client.is_reading()
            assert calls(conn.client) == self.closed_calls()
            await asyncio.sleep(0.01)
            assert conn.client_protocol.events.count("lost") == 1
            await conn.aclose()

        self.run(scenario)

    def test_peer_reset_while_paused_reading(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.client.pause_reading()
            reset(conn.server)
            await asyncio.sleep(0.05)
            lost = conn.client_protocol.lost
            if self.differs(NOTICES_RESET_WHILE_PAUSED):
                assert type(await lost) is ConnectionResetError
            else:
                # Not reading, the loop's transport does not look at the
                # socket: the reset waits for resume_reading (or a write).
                assert not lost.done()
                assert not conn.client.is_closing()
                conn.client.resume_reading()
                assert type(await lost) is ConnectionResetError
            await conn.aclose()

        self.run(scenario)

    @pytest.mark.parametrize("eof_first", [False, True])
    def test_close_sends_what_is_buffered_first(self, eof_first: bool) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.server.pause_reading()
            payload = bytes(range(256)) * 4096  # 1 MiB
            conn.client.write(payload)
            if eof_first:
                conn.client.write_eof()
                assert not conn.client.is_closing()
            conn.client.close()
            assert conn.client.is_closing()
            await asyncio.sleep(0.02)
            conn.server.resume_reading()
            await conn.server_protocol.eof
            assert conn.server_protocol.data == payload
            assert await conn.client_protocol.lost is None
            await conn.aclose()

        self.run(scenario)

    def test_peer_gone_mid_write(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.server.pause_reading()
            conn.client.set_write_buffer_limits(high=1 << 30)
            conn.client.write(bytes(8 << 20))
            await asyncio.sleep(0.01)
            reset(conn.server)
            exc = await conn.client_protocol.lost
            assert type(exc) in (ConnectionResetError, BrokenPipeError), repr(exc)
            assert conn.client.is_closing()
            assert conn.client.get_write_buffer_size() == 0
            assert calls(conn.client) == self.closed_calls()
            await asyncio.sleep(0.01)
            assert conn.client_protocol.events.count("lost") == 1
            await conn.aclose()

        self.run(scenario)

    def test_peer_closed_while_we_write(self) -> None:
        """The peer closes cleanly; we keep writing: the send fails (EPIPE or
        a reset), is_closing() turns true before connection_lost runs."""

        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.server.close()
            await conn.client_protocol.eof
            t = conn.client
            async with asyncio.timeout(5):
                while not t.is_closing():
                    t.write(b"x" * 1000)
                    await asyncio.sleep(0.001)
            exc = await conn.client_protocol.lost
            assert type(exc) in (ConnectionResetError, BrokenPipeError), repr(exc)
            await conn.aclose()

        self.run(scenario)


class TestAsyncioTCP(LifecycleTests, impls.AsyncioTCP):
    pass


class TestUvloopTCP(LifecycleTests, impls.UvloopTCP):
    pass


class TestColocAsyncioTCP(LifecycleTests, impls.ColocAsyncioTCP):
    pass


class TestColocAsyncioSHM(LifecycleTests, impls.ColocAsyncioSHM):
    pass


class TestColocAsyncioSwitched(LifecycleTests, impls.ColocAsyncioSwitched):
    pass


class TestColocUvloopTCP(LifecycleTests, impls.ColocUvloopTCP):
    pass


class TestColocUvloopSHM(LifecycleTests, impls.ColocUvloopSHM):
    pass


class TestColocUvloopSwitched(LifecycleTests, impls.ColocUvloopSwitched):
    pass
