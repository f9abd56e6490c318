"""Shared-memory connections between two real processes: peer death, a writer
blocked on a full pipe when its reader dies, and idle CPU."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.shm import MemfdSegment, Pool, PoolConfig
from aiocoloc.transport import SwitchableTransport, attach_shared_memory, open_transport

from .test_transport import LOOPS, Recorder, run
from .transport_pair import tcp_socket_pair

PEER = Path(__file__).with_name("transport_peer.py")


class Remote:
    """Our transport, and a child process holding the other end."""

    def __init__(
        self,
        transport: SwitchableTransport,
        protocol: Any,
        child: subprocess.Popen[str],
        pool: Pool,
    ) -> None:
        self.transport, self.protocol, self.child, self.pool = transport, protocol, child, pool

    async def line(self) -> dict[str, Any]:
        assert self.child.stdout is not None
        text = await asyncio.get_running_loop().run_in_executor(None, self.child.stdout.readline)
        assert text, f"peer exited with {self.child.poll()}"
        result: dict[str, Any] = json.loads(text)
        return result

    def close(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()
        self.pool.close()


async def connect_remote(role: str) -> Remote:
    loop = asyncio.get_running_loop()
    pool = Pool.create(
        MemfdSegment.create(8 << 20),
        PoolConfig(slice_size=65536, max_pipes=4, max_slices_per_pipe=64, lease=60),
    )
    mine, theirs = tcp_socket_pair()
    ctrl_mine, ctrl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    my_bell, their_bell = new_eventfd(), new_eventfd()
    fds = [theirs.fileno(), ctrl_theirs.fileno(), pool.segment.fd, their_bell, my_bell]
    child = subprocess.Popen(
        [sys.executable, str(PEER), role, *map(str, fds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=fds,
    )
    theirs.close()
    ctrl_theirs.close()
    remote = Remote(None, None, child, pool)  # type: ignore[arg-type]
    peer_slot = (await remote.line())["slot"]
    up = pool.create_pipe(pool.slot, peer_slot, initial=4)
    down = pool.create_pipe(peer_slot, pool.slot, initial=4)
    assert child.stdin is not None
    child.stdin.write(f"{up.slot} {up.generation} {down.slot} {down.generation}\n")
    child.stdin.flush()
    transport, protocol = await open_transport(loop, Recorder, mine)
    attach_shared_memory(
        transport,
        pool,
        send=up,
        receive=down,
        listen_fd=my_bell,
        ring_fd=os.dup(their_bell),
        control=ctrl_mine,
    )
    os.close(their_bell)
    await protocol.made
    transport.switch_tx("shm")
    assert (await remote.line())["ready"]
    remote.transport, remote.protocol = transport, protocol
    return remote


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_echo_between_processes(loop_kind: str) -> None:
    async def scenario() -> None:
        remote = await connect_remote("echo")
        try:
            payload = os.urandom(3 << 20)
            remote.transport.write(payload)
            await remote.protocol.wait_for_bytes(len(payload))
            assert remote.protocol.data == payload
            info = remote.transport.get_extra_info("aiocoloc")
            assert info["mode"] == "shm" and info["rx_mode"] == "shm"
            remote.transport.write_eof()
            assert (await remote.line())["received"] == len(payload)
            await remote.protocol.eof  # the peer closed after our EOF: we see its EOF
            remote.transport.close()
            assert await remote.protocol.lost is None
        finally:
            remote.close()

    run(loop_kind, scenario)


def test_echo_while_both_sides_keep_switching_paths(loop_kind: str) -> None:
    async def scenario() -> None:
        remote = await connect_remote("echo-switching")
        try:
            rng = random.Random(12)
            payload = rng.randbytes(4 << 20)
            sent = 0
            while sent < len(payload):
                n = rng.choice([10, 1000, 50_000, 300_000])
                remote.transport.write(payload[sent : sent + n])
                sent += n
                if rng.random() < 0.3:
                    remote.transport.switch_tx("tcp" if remote.transport.mode == "shm" else "shm")
                await asyncio.sleep(0)
            await remote.protocol.wait_for_bytes(len(payload))
            assert remote.protocol.data == payload
            assert remote.transport.switches >= 3  # (a switch asked for mid-round-trip waits)
            remote.transport.write_eof()
            assert (await remote.line())["received"] == len(payload)
            await remote.protocol.eof
            remote.transport.close()
            assert await remote.protocol.lost is None
        finally:
            remote.close()

    run(loop_kind, scenario)


@pytest.mark.parametrize("role", ["echo", "stall"])
def test_peer_killed_mid_stream_is_reported_within_100ms(loop_kind: str, role: str) -> None:
    async def scenario() -> None:
        remote = await connect_remote(role)
        try:
            chunk = os.urandom(256 * 1024)
            for _ in range(40):  # traffic in both directions (echo) / a full pipe (stall)
                remote.transport.write(chunk)
                await asyncio.sleep(0.001)
            if role == "stall":
                assert remote.transport.get_write_buffer_size() > 0  # blocked on a full pipe
            remote.child.kill()
            killed = time.monotonic()
            exc = await remote.protocol.lost
            elapsed = time.monotonic() - killed
            assert isinstance(exc, ConnectionResetError), exc
            assert elapsed < 0.1, f"connection_lost came {elapsed * 1000:.0f} ms after kill -9"
            await asyncio.sleep(0.05)
            remote.child.wait()
            stats = remote.pool.stats()
            assert stats["open_ends"] == 0
            assert stats["slices_used"] == 0  # both pipes back in the pool at once
        finally:
            remote.close()

    run(loop_kind, scenario)


def test_peer_dying_tcp_first_still_frees_its_pipes_at_once(loop_kind: str) -> None:
    """A peer whose TCP breaks before its process dies: the TCP loss ends the
    connection at once, and the pipes it never closed come back as soon as
    its control socket closes, not after the pool's lease."""

    async def scenario() -> None:
        remote = await connect_remote("stall")
        try:
            for _ in range(20):  # a full pipe, the peer's ends open
                remote.transport.write(os.urandom(256 * 1024))
                await asyncio.sleep(0.001)
            assert remote.child.stdin is not None
            remote.child.stdin.write("die-tcp-first\n")
            remote.child.stdin.flush()
            exc = await remote.protocol.lost
            assert isinstance(exc, ConnectionResetError), exc
            assert remote.pool.stats()["slices_used"] > 0  # its ends are open: not ours to free yet
            await asyncio.get_running_loop().run_in_executor(None, remote.child.wait)
            deadline = time.monotonic() + 1.0
            while remote.pool.stats()["slices_used"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stats = remote.pool.stats()
            assert stats["open_ends"] == 0
            assert stats["slices_used"] == 0
        finally:
            remote.close()

    run(loop_kind, scenario)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def assert_both_idle(remote: Remote, settle: float, seconds: float) -> None:
    """Neither process uses more than 50 ms of CPU over ``seconds``."""
    await asyncio.sleep(settle)
    mine, theirs = _cpu_seconds(os.getpid()), _cpu_seconds(remote.child.pid)
    await asyncio.sleep(seconds)
    used_mine = _cpu_seconds(os.getpid()) - mine
    used_theirs = _cpu_seconds(remote.child.pid) - theirs
    threads = [t.name for t in threading.enumerate()]
    assert used_mine < 0.05 and used_theirs < 0.05, (used_mine, used_theirs, threads)


def test_idle_connection_uses_no_cpu(loop_kind: str) -> None:
    async def scenario() -> None:
        remote = await connect_remote("idle")
        try:
            remote.transport.write(b"wake up once")
            await assert_both_idle(remote, settle=0.2, seconds=2.0)
        finally:
            remote.transport.abort()
            remote.close()

    run(loop_kind, scenario)


@pytest.mark.parametrize("size", [64, 65536])
def test_ping_pong_spins_instead_of_ringing_then_goes_quiet(loop_kind: str, size: int) -> None:
    """Request/response between two processes: the reader watches the pipe for
    the reply (bounded spin), so most round trips need no doorbell; once the
    traffic stops, both sides stop spinning and use no CPU.  64 KiB replies
    take longer than a spin while both sides sleep: two peers that rang each
    other could stay asleep for good (``aiocoloc.notify.spin``, probes)."""

    async def scenario() -> None:
        remote = await connect_remote("echo")
        try:
            transport, protocol = remote.transport, remote.protocol
            assert transport._spin is not None and transport._spin.enabled
            bell = transport._shm.doorbell  # type: ignore[union-attr]
            rounds, rings_before = 400, bell.rings
            for i in range(rounds):
                message = i.to_bytes(size, "big")
                transport.write(message)
                await protocol.wait_for_bytes(size * (i + 1))
            assert protocol.data == b"".join(i.to_bytes(size, "big") for i in range(rounds))
            rung = bell.rings - rings_before
            if size == 64:
                assert transport._spin.hits >= rounds // 4, (transport._spin.hits, rung)
                assert rung < rounds * 3 // 4, (transport._spin.hits, rung)
            else:  # whether the peer is awake for our next request depends on our pace
                assert transport._spin.hits >= rounds // 2, (transport._spin.hits, rung)
            await assert_both_idle(remote, settle=0.3, seconds=1.0)
        finally:
            remote.transport.abort()
            remote.close()

    run(loop_kind, scenario)
