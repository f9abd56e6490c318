"""Writing: types and messages, ``writelines``, writes after close and
their warning, write buffer limits and flow control."""

from __future__ import annotations

import array
import asyncio
import logging

import pytest

from . import impls
from .impls import WARNS_ON_OWN_LOGGER, Impl

CONNLOST_WARNING = "socket.send() raised exception."


class WriteTests(Impl):
    def test_non_bytes_writes(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            t = conn.client
            for bad in ("text", 1, [b"a"]):
                name = type(bad).__name__
                if self.uvloop:  # uvloop takes any buffer, through memoryview()
                    message = f"memoryview: a bytes-like object is required, not '{name}'"
                else:
                    message = f"data argument must be a bytes-like object, not '{name}'"
                with pytest.raises(TypeError) as info:
                    t.write(bad)
                assert str(info.value) == message
            # A buffer that is not bytes: uvloop sends it, asyncio refuses it.
            if self.uvloop:
                t.write(array.array("B", b"arr"))
                t.write("")  # empty: uvloop returns before looking at the type
                t.write(None)
            else:
                with pytest.raises(TypeError, match="not 'array'"):
                    t.write(array.array("B", b"arr"))
                t.write(b"arr")
            t.write(b"")
            t.write(bytearray(b"!"))
            t.write(memoryview(b"abc")[1:2])
            # A view of 2-byte items: every byte goes, not len() of them.
            t.write(memoryview(array.array("H", [0x4443, 0x4645])))
            await conn.server_protocol.wait_for_bytes(9)
            assert bytes(conn.server_protocol.data) == b"arr!bCDEF"
            await conn.aclose()

        self.run(scenario)

    def test_writelines(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            t = conn.client
            t.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
            await conn.midway()
            t.writelines(iter([b"d", b"e"]))
            t.writelines([])
            with pytest.raises(TypeError) as info:
                t.writelines([b"f", "g"])
            if self.uvloop:  # uvloop checks each: "f" is buffered before "g" fails
                assert str(info.value) == "memoryview: a bytes-like object is required, not 'str'"
                expected = b"abcdefg"
            else:  # asyncio joins them first: nothing is buffered
                assert str(info.value) == "sequence item 1: expected a bytes-like object, str found"
                expected = b"abcdeg"
            t.write(b"g")  # (uvloop sends what a failed writelines buffered with the next write)
            t.write_eof()
            with pytest.raises(RuntimeError, match="after write_eof"):
                t.writelines([b"h"])
            await conn.server_protocol.eof
            assert bytes(conn.server_protocol.data) == expected
            await conn.aclose()

        self.run(scenario)

    def test_write_after_close_warns_from_the_fifth(self) -> None:
        """asyncio drops writes to a closed transport and warns from the fifth
        on; uvloop's raises RuntimeError once connection_lost came."""

        async def scenario() -> list[logging.LogRecord]:
            conn = await self.connect()
            await conn.midway()
            conn.client.close()
            records: list[logging.LogRecord] = []
            handler = Collect(records)
            for name in ("asyncio", "aiocoloc"):
                logging.getLogger(name).addHandler(handler)
            try:
                for _ in range(3):
                    conn.client.write(b"while closing")  # dropped, no error
                assert await conn.client_protocol.lost is None
                if self.uvloop:
                    with pytest.raises(RuntimeError, match="the handler is closed"):
                        conn.client.write(b"closed")
                else:
                    for _ in range(4):
                        conn.client.write(b"closed")
            finally:
                for name in ("asyncio", "aiocoloc"):
                    logging.getLogger(name).removeHandler(handler)
            await asyncio.sleep(0.01)
            assert conn.server_protocol.data == b""
            await conn.aclose()
            return [r for r in records if r.getMessage() == CONNLOST_WARNING]

        warnings = self.run(scenario)
        # asyncio: close() counts 1, each write one more, the 5th warns and on.
        assert len(warnings) == (0 if self.uvloop else 3)
        logger = "aiocoloc.transport" if self.differs(WARNS_ON_OWN_LOGGER) else "asyncio"
        assert {r.name for r in warnings} <= {logger}

    def test_write_buffer_limits(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            t = conn.client
            t.set_write_buffer_limits(high=1000)
            assert t.get_write_buffer_limits() == (250, 1000)
            await conn.midway()
            t.set_write_buffer_limits(low=100)
            assert t.get_write_buffer_limits() == (100, 400)
            t.set_write_buffer_limits(high=0)
            assert t.get_write_buffer_limits() == (0, 0)
            t.set_write_buffer_limits()
            assert t.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
            for kw, message in (
                ({"high": 1, "low": 2}, "high (1) must be >= low (2) must be >= 0"),
                ({"low": -1}, "high (-4) must be >= low (-1) must be >= 0"),
                ({"high": -1}, "high (-1) must be >= low (-1) must be >= 0"),
            ):
                with pytest.raises(ValueError) as info:
                    t.set_write_buffer_limits(**kw)
                assert str(info.value) == message
            assert t.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
            await conn.aclose()

        self.run(scenario)

    def test_flow_control_pairs_pause_and_resume(self) -> None:
        async def scenario() -> None:
            conn = await self.connect()
            await conn.midway()
            conn.server.pause_reading()
            chunk = bytes(64 * 1024)
            total = 0
            async with asyncio.timeout(10):
                while "pause" not in conn.client_protocol.events:
                    conn.client.write(chunk)
                    total += len(chunk)
                    await asyncio.sleep(0)
            assert conn.client.get_write_buffer_size() > 0
            conn.server.resume_reading()
            await conn.server_protocol.wait_for_bytes(total)
            async with asyncio.timeout(10):
                while conn.client_protocol.events[-1] != "resume":
                    await asyncio.sleep(0.005)
            flow = [e for e in conn.client_protocol.events if e in ("pause", "resume")]
            assert flow == ["pause", "resume"] * (len(flow) // 2)
            assert conn.client.get_write_buffer_size() <= conn.client.get_write_buffer_limits()[0]
            await conn.aclose()

        self.run(scenario)


class Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class TestAsyncioTCP(WriteTests, impls.AsyncioTCP):
    pass


class TestUvloopTCP(WriteTests, impls.UvloopTCP):
    pass


class TestColocAsyncioTCP(WriteTests, impls.ColocAsyncioTCP):
    pass


class TestColocAsyncioSHM(WriteTests, impls.ColocAsyncioSHM):
    pass


class TestColocAsyncioSwitched(WriteTests, impls.ColocAsyncioSwitched):
    pass


class TestColocUvloopTCP(WriteTests, impls.ColocUvloopTCP):
    pass


class TestColocUvloopSHM(WriteTests, impls.ColocUvloopSHM):
    pass


class TestColocUvloopSwitched(WriteTests, impls.ColocUvloopSwitched):
    pass
