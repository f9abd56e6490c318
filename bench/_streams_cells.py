"""The stream cells of ``bench/streams.py``: one connection of one kind
to a fresh server process, and what is measured over it (one-way streams,
ping-pong, idle CPU)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiocoloc
from bench._streams_server import LOOPS, spawn, stop

__all__ = [
    "KINDS",
    "STREAM_ONLY",
    "Connection",
    "NotUpgraded",
    "Streams",
    "idle_cell",
    "rr_cell",
    "run_cell",
    "stream_cell",
    "upgraded",
]

KINDS = ["tcp", "uds", "shm", "shm-as-run"]
#: Kinds measured in the stream cells only.
STREAM_ONLY = {"shm-as-run"}
#: How long a shm connection may take to upgrade before the bench gives up.
UPGRADE_DEADLINE = 5.0
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class NotUpgraded(RuntimeError):
    """An ``upgrade="always"`` connection stayed on TCP."""


async def upgraded(writer: asyncio.StreamWriter, timeout: float = UPGRADE_DEADLINE) -> None:
    """Wait until both directions of an aiocoloc connection are on shared memory."""
    deadline = time.perf_counter() + timeout
    while True:
        info = writer.transport.get_extra_info("aiocoloc")
        if info is None:
            raise NotUpgraded("not an aiocoloc connection")
        if info["mode"] == "shm" and info["rx_mode"] == "shm":
            return
        if info["fallback_reason"] is not None or time.perf_counter() > deadline:
            raise NotUpgraded(
                f"mode={info['mode']} rx_mode={info['rx_mode']} after "
                f"{timeout - deadline + time.perf_counter():.3f} s; "
                f"fallback_reason={info['fallback_reason']!r} "
                f"detail={info['fallback_detail']!r}"
            )
        await asyncio.sleep(0)


class Connection:
    """A client connection to a fresh server process of one kind."""

    def __init__(self, kind: str, loop_name: str) -> None:
        self.kind, self.loop_name = kind, loop_name
        self.child: subprocess.Popen[str] | None = None
        self.path = ""

    def _spawn(self, args: list[str]) -> str:
        self.child, line = spawn(self.kind, self.loop_name, args)
        return line

    async def open(self) -> Streams:
        """Spawn the server and connect (``shm``: once upgraded both ways)."""
        if self.kind == "tcp":
            port = int(self._spawn([]))
            return await asyncio.open_connection("127.0.0.1", port)
        if self.kind == "uds":
            self.path = tempfile.mktemp(prefix="aiocoloc-bench-", suffix=".sock")
            await asyncio.get_running_loop().run_in_executor(None, self._spawn, [self.path])
            return await asyncio.open_unix_connection(self.path)
        port = int(self._spawn([]))
        if self.kind == "shm-as-run":  # the default policy, and nothing waits for it
            return await aiocoloc.open_connection("127.0.0.1", port)
        reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        try:
            await upgraded(writer)
        except NotUpgraded:
            writer.close()  # the server process ends with its connection
            raise
        return reader, writer

    def close(self) -> None:
        if self.child is not None:
            stop(self.child)
        if self.path:
            Path(self.path).unlink(missing_ok=True)


async def stream_cell(conn: Connection, size: int, seconds: float) -> dict[str, float]:
    """Bytes per second of ``write(); await drain()`` (timed from connected),
    and the CPU both processes spent on it, in seconds per GB moved."""
    reader, writer = await conn.open()
    writer.write(b"S" + size.to_bytes(8, "big"))
    chunk = os.urandom(size)
    sent = 0
    assert conn.child is not None
    cpu_before = _cpu(os.getpid()) + _cpu(conn.child.pid)
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(32):
            writer.write(chunk)
            await writer.drain()
        sent += 32 * size
    if conn.kind in STREAM_ONLY:  # it must have upgraded on the way
        info = writer.transport.get_extra_info("aiocoloc")
        if info["mode"] != "shm":
            raise NotUpgraded(f"{conn.kind} stream of {size} B stayed on TCP: {info}")
    writer.write_eof()
    got = int.from_bytes(await reader.readexactly(8), "big")
    elapsed = time.perf_counter() - start
    cpu = _cpu(os.getpid()) + _cpu(conn.child.pid) - cpu_before
    writer.close()
    assert got == sent, (got, sent)
    return {"bytes_per_s": sent / elapsed, "cpu_s_per_gb": cpu / (sent / 1e9)}


async def rr_cell(
    conn: Connection, size: int, seconds: float, interval: float = 0.0
) -> dict[str, float]:
    """Round trips of ``size`` B, ``interval`` s apart: round trips per
    second spent in them, p50 and p99 in microseconds."""
    reader, writer = await conn.open()
    writer.write(b"R" + size.to_bytes(8, "big"))
    message = os.urandom(size)
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        writer.write(message)
        await writer.drain()
        await reader.readexactly(size)
        latencies.append(time.perf_counter() - t0)
        if interval:
            await asyncio.sleep(interval)
    writer.write_eof()
    writer.close()
    latencies.sort()
    return {
        "rtt_per_s": len(latencies) / sum(latencies),
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_cell(conn: Connection, seconds: float) -> float:
    """CPU of both processes of a connected, idle pair (in cores)."""
    _, writer = await conn.open()
    writer.write(b"I" + bytes(8))
    await asyncio.sleep(0.1)
    assert conn.child is not None
    before = _cpu(os.getpid()) + _cpu(conn.child.pid)
    await asyncio.sleep(seconds)
    used = _cpu(os.getpid()) + _cpu(conn.child.pid) - before
    writer.write_eof()
    writer.close()
    return used / seconds


def run_cell(kind: str, loop_name: str, make: Callable[[Connection], Any]) -> Any:
    """``make`` a cell over a fresh connection of ``kind`` on a new loop."""
    conn = Connection(kind, loop_name)
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            return runner.run(asyncio.wait_for(make(conn), 120))
    finally:
        conn.close()
