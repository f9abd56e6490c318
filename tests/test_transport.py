"""The SwitchableTransport contract, over plain TCP, over shared memory, and
across switches between the two -- on asyncio's loop and on uvloop.

Every test runs in every mode (the uvloop-style behaviour mixin):
  tcp       the transport never leaves TCP
  shm       both directions move to shared memory right after connecting
  switched  both directions switch back and forth while data flows
  shm-socket-bell  as shm, with doorbells carried on the control socket
            (as between VMs, where no eventfd can be shared)
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiocoloc.shm.elastic import ElasticConfig
from aiocoloc.transport import SwitchableTransport
from aiocoloc.transport.tls import start_tls

from .conftest import FUZZ_SCALE
from .transport_pair import BufferedRecorder, Pair, Recorder, make_pair

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
MODES = ["tcp", "shm", "switched", "shm-socket-bell"]


def run(loop_kind: str, coro: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
        return runner.run(asyncio.wait_for(coro(), timeout))


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def connect(
    mode: str,
    client: Callable[[], asyncio.BaseProtocol] = Recorder,
    server: Callable[[], asyncio.BaseProtocol] = Recorder,
    **kw: Any,
) -> Pair:
    pair = await make_pair(
        client, server, shm=mode != "tcp", socket_bell=mode == "shm-socket-bell", **kw
    )
    await pair.client_protocol.made
    await pair.server_protocol.made
    if mode.startswith("shm"):
        pair.client.switch_tx("shm")
        pair.server.switch_tx("shm")
    return pair


def maybe_switch(mode: str, transport: SwitchableTransport, rng: random.Random) -> None:
    if mode == "switched" and rng.random() < 0.3:
        transport.switch_tx("tcp" if transport.mode == "shm" else "shm")


async def teardown(pair: Pair) -> None:
    for t in (pair.client, pair.server):
        t.close()
    for p in (pair.client_protocol, pair.server_protocol):
        await p.lost
    if pair.pool is not None:
        stats = pair.pool.stats()
        assert stats["slices_used"] == 0, "the connection's pipes were not given back"
        assert stats["open_ends"] == 0
        pair.pool.close()


# --- data ----------------------------------------------------------------------------


def test_streams_arrive_exact_in_both_directions(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        rng = random.Random(3)
        sent = {"c": bytearray(), "s": bytearray()}
        for _ in range(60):
            for key, transport in (("c", pair.client), ("s", pair.server)):
                chunk = rng.randbytes(rng.choice([1, 7, 100, 5000, 70000]))
                transport.write(chunk)
                sent[key] += chunk
                maybe_switch(mode, transport, rng)
            await asyncio.sleep(0)
        pair.client.write_eof()
        pair.server.write_eof()
        await pair.server_protocol.eof
        await pair.client_protocol.eof
        assert pair.server_protocol.data == sent["c"]
        assert pair.client_protocol.data == sent["s"]
        if mode == "switched":
            assert pair.client.switches > 5 and pair.server.switches > 5
        await teardown(pair)

    run(loop_kind, scenario)


def test_callback_order_and_connection_lost_once(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode, server=lambda: Recorder(keep_open_on_eof=False))
        pair.client.write(b"hello")
        pair.client.write_eof()
        assert await pair.server_protocol.lost is None  # eof_received false: closed
        pair.client.close()
        assert await pair.client_protocol.lost is None
        await asyncio.sleep(0.05)
        assert pair.server_protocol.events == ["made", "data", "eof", "lost"]
        assert pair.client_protocol.events[0] == "made"
        assert pair.client_protocol.events.count("lost") == 1
        pair.client.close()  # idempotent, no second connection_lost
        pair.client.abort()
        await asyncio.sleep(0.01)
        assert pair.client_protocol.events.count("lost") == 1
        if pair.pool is not None:
            pair.pool.close()

    run(loop_kind, scenario)


def test_half_close_keeps_the_other_direction_open(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        pair.client.write(b"question")
        pair.client.write_eof()
        await pair.server_protocol.eof
        assert bytes(pair.server_protocol.data) == b"question"
        assert not pair.server.is_closing()
        pair.server.write(b"answer")
        await pair.client_protocol.wait_for_bytes(6)
        assert bytes(pair.client_protocol.data) == b"answer"
        with pytest.raises(RuntimeError, match="after write_eof"):
            pair.client.write(b"more")
        assert pair.client.can_write_eof()
        await teardown(pair)

    run(loop_kind, scenario)


def test_write_after_close_is_dropped_with_a_warning(
    mode: str, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        pair.client.close()
        await pair.client_protocol.lost
        if loop_kind == "uvloop":  # as uvloop's own transport, once closed
            with pytest.raises(RuntimeError, match="the handler is closed"):
                pair.client.write(b"lost")
            await teardown(pair)
            return
        with caplog.at_level(logging.WARNING, logger="aiocoloc.transport"):
            for _ in range(7):
                pair.client.write(b"lost")  # no exception
        assert "socket.send() raised exception." in caplog.text
        await teardown(pair)

    run(loop_kind, scenario)


def test_abort_discards_and_reports_once(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode, pipe_slices=1)
        pair.client.set_write_buffer_limits(high=1 << 30)
        pair.server.pause_reading()
        pair.client.write(bytes(1 << 20))
        pair.client.abort()
        assert await pair.client_protocol.lost is None
        assert pair.client.get_write_buffer_size() == 0
        assert pair.client_protocol.events.count("lost") == 1
        await teardown(pair)

    run(loop_kind, scenario)


def test_write_type_errors(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        with pytest.raises(TypeError, match="bytes-like"):
            pair.client.write("text")  # type: ignore[arg-type]
        pair.client.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
        await pair.server_protocol.wait_for_bytes(3)
        assert bytes(pair.server_protocol.data) == b"abc"
        await teardown(pair)

    run(loop_kind, scenario)


# --- flow control -------------------------------------------------------------------------


def test_flow_control_pairs_under_a_slow_reader(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode, pipe_slices=1)
        # The loop's own defaults (uvloop's low-water mark is 16 bytes).
        low = 16 if loop_kind == "uvloop" else 16 * 1024
        assert pair.client.get_write_buffer_limits() == (low, 64 * 1024)
        # The loop's TCP transport keeps its own limits (it is not told ours):
        # its high-water mark must be ours, for its pause_writing to be ours.
        assert pair.client._tcp.get_write_buffer_limits()[1] == 64 * 1024  # type: ignore[union-attr]
        pair.server.pause_reading()
        pair.server.pause_reading()  # idempotent
        assert not pair.server.is_reading()
        chunk = bytes(16 * 1024)
        total = 0
        while "pause" not in pair.client_protocol.events:
            pair.client.write(chunk)
            total += len(chunk)
            await asyncio.sleep(0)
            assert total < 64 << 20, "pause_writing never came"
        assert pair.client.get_write_buffer_size() > 64 * 1024
        pair.server.resume_reading()
        pair.server.resume_reading()
        assert pair.server.is_reading()
        await pair.server_protocol.wait_for_bytes(total)
        for _ in range(100):
            if "resume" in pair.client_protocol.events:
                break
            await asyncio.sleep(0.01)
        flow = [e for e in pair.client_protocol.events if e in ("pause", "resume")]
        assert flow == ["pause", "resume"] * (len(flow) // 2)
        assert len(pair.server_protocol.data) == total
        await teardown(pair)

    run(loop_kind, scenario)


def test_write_buffer_limits(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        pair.client.set_write_buffer_limits(high=1000)
        assert pair.client.get_write_buffer_limits() == (250, 1000)
        pair.client.set_write_buffer_limits(low=100)
        assert pair.client.get_write_buffer_limits() == (100, 400)
        with pytest.raises(ValueError):
            pair.client.set_write_buffer_limits(high=1, low=2)
        await teardown(pair)

    run(loop_kind, scenario)


# --- protocols ------------------------------------------------------------------------------


def test_buffered_protocol_reads_into_its_buffer(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode, server=BufferedRecorder)
        payload = random.Random(1).randbytes(300_000)
        pair.client.write(payload)
        pair.client.write_eof()
        await pair.server_protocol.eof
        assert pair.server_protocol.data == payload
        assert pair.server_protocol.updates >= 300  # 1000-byte buffer
        await teardown(pair)

    run(loop_kind, scenario)


def test_set_protocol_mid_stream(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        pair.client.write(b"A" * 5000)
        await pair.server_protocol.wait_for_bytes(5000)
        second = BufferedRecorder(777)
        pair.server.set_protocol(second)
        assert pair.server.get_protocol() is second
        pair.client.write(b"B" * 5000)
        pair.client.write_eof()
        await second.eof
        assert bytes(pair.server_protocol.data) == b"A" * 5000
        assert bytes(second.data) == b"B" * 5000
        pair.server.close()
        await second.lost
        pair.client.close()
        await pair.client_protocol.lost
        if pair.pool is not None:
            pair.pool.close()

    run(loop_kind, scenario)


def test_protocol_errors_are_fatal_and_reported(mode: str, loop_kind: str) -> None:
    class Broken(Recorder):
        def data_received(self, data: bytes) -> None:
            raise ValueError("boom")

    async def scenario() -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        pair = await connect(mode, server=Broken)
        pair.client.write(b"x")
        exc = await pair.server_protocol.lost
        assert isinstance(exc, ValueError) and str(exc) == "boom"
        # Reported once, in the words of the loop's own transport (uvloop's
        # differ from asyncio's), on TCP alone by it, over shared memory by ours.
        assert len(errors) == 1 and errors[0]["exception"] is exc
        assert "Fatal error" in errors[0]["message"]
        if loop_kind == "asyncio":
            assert "data_received" in errors[0]["message"]
        await teardown(pair)

    run(loop_kind, scenario)


def test_extra_info_survives_close(mode: str, loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect(mode)
        peer = pair.client.get_extra_info("peername")
        assert peer == pair.server.get_extra_info("sockname")
        assert peer[0] == "127.0.0.1"
        assert isinstance(pair.client.get_extra_info("socket"), (socket.socket, object))
        info = pair.client.get_extra_info("aiocoloc")
        assert info["mode"] == ("shm" if mode.startswith("shm") else "tcp")
        assert (info["pool"] is None) == (mode == "tcp")
        assert pair.client.get_extra_info("no-such-key", 42) == 42
        await teardown(pair)
        assert pair.client.get_extra_info("peername") == peer
        assert pair.client.get_extra_info("socket") is not None

    run(loop_kind, scenario)


# --- random interleavings ---------------------------------------------------------------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["c", "s"]),
        st.sampled_from(["write", "write", "write", "switch", "pause", "resume", "yield"]),
        st.integers(1, 100_000),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=100 * FUZZ_SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(actions=ACTIONS, loop_kind=st.sampled_from(list(LOOPS)))
def test_random_writes_pauses_and_switches_keep_both_streams(
    actions: list[tuple[str, str, int]], loop_kind: str
) -> None:
    async def scenario() -> None:
        pair = await connect("switched")
        ends = {"c": (pair.client, pair.server), "s": (pair.server, pair.client)}
        sent = {"c": bytearray(), "s": bytearray()}
        counter = 0
        for side, action, n in actions:
            writer, reader = ends[side]
            if action == "write":
                chunk = bytes((counter + i) % 253 for i in range(min(n, 3000))) * max(1, n // 3000)
                counter += 1
                writer.write(chunk)
                sent[side] += chunk
            elif action == "switch":
                writer.switch_tx("tcp" if writer.mode == "shm" else "shm")
            elif action == "pause":
                reader.pause_reading()
            elif action == "resume":
                reader.resume_reading()
            else:
                await asyncio.sleep(0)
        pair.client.resume_reading()
        pair.server.resume_reading()
        pair.client.write_eof()
        pair.server.write_eof()
        await pair.server_protocol.eof
        await pair.client_protocol.eof
        assert pair.server_protocol.data == sent["c"]
        assert pair.client_protocol.data == sent["s"]
        await teardown(pair)

    run(loop_kind, scenario)


# --- context and sendfile ----------------------------------------------------------------------


def test_callbacks_run_in_the_connections_context(mode: str, loop_kind: str) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="unset")
    seen: list[str] = []

    class Probe(Recorder):
        def data_received(self, data: bytes) -> None:
            seen.append(var.get())
            super().data_received(data)

    async def scenario() -> None:
        var.set("connection-1")
        pair = await connect(mode, server=Probe)
        var.set("changed later")  # the connection keeps the context it was made in
        pair.client.write(b"x" * 10)
        await pair.server_protocol.wait_for_bytes(10)
        assert seen and set(seen) == {"connection-1"}
        await teardown(pair)

    run(loop_kind, scenario)


def test_loop_sendfile_falls_back_to_writes(mode: str, tmp_path: Any) -> None:
    """aiohttp's FileResponse uses loop.sendfile(); over us it falls back to write()."""
    path = tmp_path / "payload.bin"
    payload = random.Random(9).randbytes(700_000)
    path.write_bytes(payload)

    async def scenario() -> None:
        pair = await connect(mode)
        with path.open("rb") as f:
            sent = await asyncio.get_running_loop().sendfile(pair.client, f)
        assert sent == len(payload)
        pair.client.write_eof()
        await pair.server_protocol.eof
        assert pair.server_protocol.data == payload
        await teardown(pair)

    run("asyncio", scenario)


def test_pipe_grows_with_demand_and_shrinks_when_idle(loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect("shm", pipe_slices=1, elastic=ElasticConfig())
        producer = pair.client._shm.producer  # type: ignore[union-attr]
        start = producer.capacity
        chunk = bytes(256 * 1024)
        # Keep the pipe busy (always a write waiting) for some resize intervals.
        loop, sent = asyncio.get_running_loop(), 0
        deadline = loop.time() + 5
        while producer.capacity < 8 * start and loop.time() < deadline:
            if pair.client.get_write_buffer_size() < 4 * len(chunk):
                pair.client.write(chunk)
                sent += len(chunk)
            await asyncio.sleep(0)
        grown = producer.capacity
        assert grown >= 8 * start, f"the busy pipe stayed at {grown} bytes"
        await pair.server_protocol.wait_for_bytes(sent)
        deadline = asyncio.get_running_loop().time() + 3
        while producer.capacity > start and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert producer.capacity == start, "the idle pipe kept its slices"
        await asyncio.sleep(0.3)
        assert pair.client._resizing.idle  # type: ignore[union-attr]  # no timer left running while idle
        await teardown(pair)

    run(loop_kind, scenario)


# --- TLS on top -----------------------------------------------------------------------------


def test_tls_runs_over_the_shared_memory_path(mode: str, loop_kind: str) -> None:
    trustme = pytest.importorskip("trustme")
    import ssl

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def scenario() -> None:
        pair = await connect(mode)
        client_app, server_app = Recorder(), Recorder()
        client_tls, server_tls = await asyncio.gather(
            start_tls(pair.client, client_app, client_ctx, server_hostname="localhost"),
            start_tls(pair.server, server_app, server_ctx, server_side=True),
        )
        assert client_tls is not None and server_tls is not None
        payload = random.Random(4).randbytes(200_000)
        client_tls.write(payload)
        await server_app.wait_for_bytes(len(payload))
        assert server_app.data == payload
        assert bytes(pair.server_protocol.data) == b""  # only ciphertext passed below
        client_tls.close()
        server_tls.close()
        await client_app.lost  # the TLS layer owns the callbacks now
        await server_app.lost
        if pair.pool is not None:
            assert pair.pool.stats()["slices_used"] == 0
            pair.pool.close()

    run(loop_kind, scenario)


# --- adoption of the loop's own connections ---------------------------------------------------


def test_loop_servers_and_clients_can_carry_switchable_transports(loop_kind: str) -> None:
    """The loop's create_server/create_connection make the TCP connection; an
    TcpAdapter wraps it, so every keyword those methods take keeps working."""
    from aiocoloc.transport import TcpAdapter

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, SwitchableTransport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: TcpAdapter(Echo), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, adapter = await loop.create_connection(lambda: TcpAdapter(Recorder), "127.0.0.1", port)
        assert isinstance(adapter, TcpAdapter)
        client, protocol = adapter.transport, adapter.protocol
        assert isinstance(client, SwitchableTransport) and isinstance(protocol, Recorder)
        await protocol.made
        client.write(b"round trip")
        await protocol.wait_for_bytes(10)
        assert bytes(protocol.data) == b"round trip"
        assert client.get_extra_info("peername") == ("127.0.0.1", port)
        client.close()
        assert await protocol.lost is None
        server.close()
        await server.wait_closed()

    run(loop_kind, scenario)


def test_pipes_are_freed_by_whichever_side_closes_last(loop_kind: str) -> None:
    async def scenario() -> None:
        pair = await connect("shm")
        assert pair.pool is not None
        used = pair.pool.stats()["slices_used"]
        pair.client.close()
        await pair.client_protocol.lost
        # The server still holds its ends: nothing may be freed under it yet.
        assert pair.pool.stats()["slices_used"] == used
        await pair.server_protocol.eof  # the client's EOF arrives through the pipe
        pair.server.close()
        await pair.server_protocol.lost
        assert pair.pool.stats()["slices_used"] == 0
        pair.pool.close()

    run(loop_kind, scenario)


def test_control_channel_lost_before_any_switch_leaves_a_tcp_connection(loop_kind: str) -> None:
    """Attached but not switched yet (an upgrade that broke off at the last
    step): losing the control channel is no reason to lose the connection."""

    async def scenario() -> None:
        pair = await make_pair(Recorder, Recorder)
        try:
            await pair.client_protocol.made
            await pair.server_protocol.made
            assert pair.client._link is not None
            pair.client._link.sock.shutdown(socket.SHUT_RDWR)  # the client's end of the link drops
            await asyncio.sleep(0.05)
            info = pair.server.get_extra_info("aiocoloc")
            assert info["fallback_reason"] == "handshake protocol error"
            assert info["pool"] is None  # the pipes were given back
            payload = os.urandom(100_000)
            pair.client.write(payload)
            await pair.server_protocol.wait_for_bytes(len(payload))
            assert pair.server_protocol.data == payload
            pair.server.write(b"still here")
            await pair.client_protocol.wait_for_bytes(10)
            assert not pair.server_protocol.lost.done()
        finally:
            pair.client.abort()
            pair.server.abort()
            await asyncio.sleep(0)
            if pair.pool is not None:
                pair.pool.close()

    run(loop_kind, scenario)


def test_an_echo_of_a_message_larger_than_both_pipes_does_not_deadlock(loop_kind: str) -> None:
    """Found by ``make soak``: a stream client writes 1 MiB, then drains,
    then reads the echo; the echo server writes each chunk back and drains.
    Over TCP the kernel's buffers hold it all.  With small pipes both sides
    ended up blocked: each full pipe's reader paused, so no byte moved.  A
    paused reader whose own writer waits now goes on emptying its pipe into
    a buffer of its own, up to ``HOLD_LIMIT``."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client_reader = asyncio.StreamReader()
        server_reader = asyncio.StreamReader()
        pair = await make_pair(
            lambda: asyncio.StreamReaderProtocol(client_reader),
            lambda: asyncio.StreamReaderProtocol(server_reader),
            pipe_slices=1,
        )
        for transport in (pair.client, pair.server):
            transport.switch_tx("shm")
        client = asyncio.StreamWriter(pair.client, pair.client_protocol, client_reader, loop)  # type: ignore[arg-type]
        server = asyncio.StreamWriter(pair.server, pair.server_protocol, server_reader, loop)  # type: ignore[arg-type]

        async def echo() -> None:
            while data := await server_reader.read(1 << 20):
                server.write(data)
                await server.drain()

        echoing = loop.create_task(echo())
        payload = os.urandom(1 << 20)
        async with asyncio.timeout(10):
            client.write(payload)
            await client.drain()
            assert await client_reader.readexactly(len(payload)) == payload
        assert pair.client.get_extra_info("aiocoloc")["mode"] == "shm"
        client.write_eof()
        await echoing
        server.close()
        client.close()
        await client.wait_closed()
        await server.wait_closed()
        assert pair.pool is not None
        pair.pool.close()

    run(loop_kind, scenario)


def test_a_writer_paused_on_the_pipe_is_resumed_when_it_switches_to_tcp(loop_kind: str) -> None:
    """Found by ``make soak``: the overflow went to the loop's TCP transport,
    which took it all at once and so never paused nor resumed the writer:
    its drain() waited for good."""

    async def scenario() -> None:
        pair = await connect("shm", pipe_slices=1)
        pair.server.pause_reading()
        chunk = bytes(64 * 1024)
        total = 0
        while "pause" not in pair.client_protocol.events:
            pair.client.write(chunk)
            total += len(chunk)
            await asyncio.sleep(0)
            assert total < 64 << 20, "pause_writing never came"
        while pair.client._switching.unacknowledged is not None:  # type: ignore[union-attr]
            await asyncio.sleep(0.001)
        assert pair.client.switch_tx("tcp") is not None
        for _ in range(200):
            if "resume" in pair.client_protocol.events:
                break
            await asyncio.sleep(0.005)
        assert pair.client_protocol.events.count("resume") == 1, pair.client_protocol.events
        pair.server.resume_reading()
        await pair.server_protocol.wait_for_bytes(total)
        assert len(pair.server_protocol.data) == total
        await teardown(pair)

    run(loop_kind, scenario)
