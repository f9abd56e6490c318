#!/usr/bin/env python3
"""asyncio streams over aiocoloc shared memory vs TCP loopback and Unix sockets.

Every contender runs on asyncio's loop and on uvloop, with the server in a
separate process, in one run:
  tcp     asyncio streams over TCP loopback (asyncio.start_server/open_connection)
  uds     asyncio streams over a Unix socket
  shm     aiocoloc.start_server/open_connection(upgrade="always"): measured once
          the connection has upgraded itself to shared memory both ways
  shm-as-run  (stream cells only) aiocoloc with the DEFAULT policy, timed from
          the moment it is connected, as a user's program runs: the first
          64 KiB go over TCP and the upgrade happens while the writer writes
          (write + drain, never yielding otherwise)

Cells: one-way streams (write + await drain() per write) for 64 B .. 1 MiB
writes (MB/s); ping-pong for 64 B, 1 KiB, 64 KiB (round trips/s, p50, p99);
a low-rate ping (one 64 B message per ms: p50/p99 latency); idle CPU of a
connected pair over one second.  Ratios are against the best socket peer.

Connection cells, against plain TCP (asyncio client, asyncio server) on the
same loop, in the same run:
  set-up  connect -> first 64 B echo round trip done (p50 over N connections);
          for shm the round trip goes over shared memory both ways, so the time
          includes the upgrade (registry lookup, handshake, pipes)
  short   connect, one 64 B request, a 1 KiB reply, close + wait_closed, one
          connection after the other: connections/s of aiocoloc's client and
          server with the DEFAULT policy ("auto": such a connection never
          upgrades) vs plain asyncio.  Blocks of the two alternate (4 x
          --seconds of each in all); the ratio is the median of the
          per-round ratios (target: >= 0.90).
  Set-up is measured warm (the client has the server's pool mapped: another
  connection used it within the last few seconds) and cold (the client
  maps the server's pool anew: ``close_idle()`` before each connection).

Usage: bench/streams.py [--seconds 0.5] [--loops asyncio,uvloop] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiocoloc
from aiocoloc.connect.colocation import local_pools
from bench._streams_report import print_report
from bench.targets import mark

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
KINDS = ["tcp", "uds", "shm", "shm-as-run"]
#: Kinds measured in the stream cells only.
STREAM_ONLY = {"shm-as-run"}
from bench._streams_report import CPU_SIZES, RR_SIZES, STREAM_SIZES  # noqa: E402

#: Idle upgraded connections opened at once to measure memory per connection.
IDLE_CONNECTIONS = 50
#: How long a shm connection may take to upgrade before the bench gives up.
UPGRADE_DEADLINE = 5.0
#: Connection cells: request size; the reply to b"E..." is the request itself,
#: to b"K..." this many bytes.
REQUEST = 64
REPLY = 1024
#: Short-lived connections: alternating blocks of each contender.
SHORT_ROUNDS = 10
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Opener = Callable[..., Awaitable[Streams]]


class NotUpgraded(RuntimeError):
    """An ``upgrade="always"`` connection stayed on TCP."""


# --- the server process ------------------------------------------------------------------


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            header = await reader.readexactly(9)
        except asyncio.IncompleteReadError:
            return  # the client gave up before it began (it did not upgrade)
        kind, size = header[:1], int.from_bytes(header[1:], "big")
        if kind == b"S":  # bulk: count until EOF, report
            n = 0
            while chunk := await reader.read(1 << 20):
                n += len(chunk)
            writer.write(n.to_bytes(8, "big"))
            await writer.drain()
        elif kind == b"I":  # idle: wait for EOF
            await reader.read()
        else:  # echo fixed-size messages until EOF
            while True:
                try:
                    message = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    break
                writer.write(message)
                await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Connection cells: answer each request (echo, or REPLY bytes) until EOF."""
    reply = bytes(REPLY)
    try:
        while True:
            try:
                request = await reader.readexactly(REQUEST)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(request if request[:1] == b"E" else reply)
            await writer.drain()
    finally:
        writer.close()


async def serve(kind: str, args: list[str]) -> None:
    loop = asyncio.get_running_loop()
    if kind in ("conn-plain", "conn-coloc"):  # many connections, until stdin closes
        start = asyncio.start_server if kind == "conn-plain" else aiocoloc.start_server
        server = await start(answer, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await loop.run_in_executor(None, sys.stdin.read)
        return

    done = loop.create_future()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        finally:
            if not done.done():
                done.set_result(None)

    if kind == "tcp":
        server = await asyncio.start_server(one, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
    elif kind == "uds":
        server = await asyncio.start_unix_server(one, args[0])
        print(args[0], flush=True)
    else:
        server = await aiocoloc.start_server(one, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await done


# --- the client side ---------------------------------------------------------------------------


def spawn(kind: str, loop_name: str, args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A server process of ``kind``; returns it and the first line it prints."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--loop", loop_name, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def stop(child: subprocess.Popen[str]) -> None:
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_cell(conn: Connection, seconds: float) -> float:
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
    conn = Connection(kind, loop_name)
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            return runner.run(asyncio.wait_for(make(conn), 120))
    finally:
        conn.close()


# --- connection cells ----------------------------------------------------------------------


async def setup_time(port: int, shm: bool) -> tuple[float, str | None]:
    """Seconds from connecting to the end of the first 64 B echo round trip
    (over shared memory both ways for ``shm``), and the pool used."""
    request = b"E" + bytes(REQUEST - 1)
    t0 = time.perf_counter()
    if shm:
        reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(writer)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await reader.readexactly(REQUEST)
    elapsed = time.perf_counter() - t0
    pool = None
    if shm:
        info = writer.transport.get_extra_info("aiocoloc")
        assert info["mode"] == info["rx_mode"] == "shm", info
        pool = info["pool"]
    writer.close()
    await writer.wait_closed()
    return elapsed, pool


async def setup_cells(plain: int, coloc: int, n: int) -> dict[str, Any]:
    """Set-up times, shm alternating with plain TCP.  Warm: the server's pool
    is still mapped here (pools linger after their last connection); cold:
    mapped anew for each connection."""
    tcp: list[float] = []
    shm: dict[str, list[float]] = {"cold": [], "warm": []}
    for shm_ in (False, True):  # warm up (imports, the registry directory)
        for _ in range(3):
            await setup_time(coloc if shm_ else plain, shm_)
    for phase in ("cold", "warm"):
        for i in range(n):
            for shm_ in (i % 2 == 0, i % 2 == 1):
                if phase == "cold" and shm_:
                    local_pools().close_idle()  # map the server's pool anew
                elapsed, _ = await setup_time(coloc if shm_ else plain, shm_)
                (shm[phase] if shm_ else tcp).append(elapsed)
    return {
        "setup_connections": n,
        "tcp_setup_p50_us": statistics.median(tcp) * 1e6,
        "shm_setup_p50_us": statistics.median(shm["warm"]) * 1e6,
        "shm_setup_p99_us": sorted(shm["warm"])[int(len(shm["warm"]) * 0.99)] * 1e6,
        "shm_cold_setup_p50_us": statistics.median(shm["cold"]) * 1e6,
    }


def _rss() -> int:
    """This process's resident memory, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def idle_memory(coloc: int, n: int) -> dict[str, float]:
    """What an idle upgraded connection holds: slices of the shared pool
    (both pipes, after they gave their first slices back) and this process's
    memory, per connection, over ``n`` connections open at once."""
    rss_before = _rss()
    writers = []
    try:
        for _ in range(n):
            _, writer = await aiocoloc.open_connection("127.0.0.1", coloc, upgrade="always")
            writers.append(writer)
            await upgraded(writer)
        await asyncio.sleep(0.5)  # idle pipes shrink within a few resize intervals
        pool_id = writers[0].transport.get_extra_info("aiocoloc")["pool"]
        pool = local_pools().get(pool_id)
        assert pool is not None
        stats = pool.stats()
        shm_bytes = stats["slices_used"] * pool.geometry.slice_size / n
        rss = (_rss() - rss_before) / n
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    return {
        "idle_connections": n,
        "idle_shm_bytes_per_conn": shm_bytes,
        "idle_client_rss_bytes_per_conn": rss,
        "idle_conns_per_64mib_pool": (64 << 20) / max(shm_bytes, 1.0),
    }


async def short_connection(open_connection: Opener, port: int) -> None:
    reader, writer = await open_connection("127.0.0.1", port)
    writer.write(b"K" + bytes(REQUEST - 1))
    await reader.readexactly(REPLY)
    writer.close()
    await writer.wait_closed()


async def short_block(open_connection: Opener, port: int, seconds: float) -> tuple[float, float]:
    """Short connections one after the other for ``seconds``: (conn/s, p50 s)."""
    latencies = []
    start = time.perf_counter()
    deadline = start + seconds
    while (t0 := time.perf_counter()) < deadline:
        await short_connection(open_connection, port)
        latencies.append(time.perf_counter() - t0)
    return len(latencies) / (time.perf_counter() - start), statistics.median(latencies)


async def connection_cells(plain: int, coloc: int, seconds: float) -> dict[str, Any]:
    """``plain``: port of an asyncio server, ``coloc``: of an aiocoloc server."""
    row = await setup_cells(plain, coloc, max(20, round(100 * seconds)))
    row.update(await idle_memory(coloc, IDLE_CONNECTIONS))
    contenders: dict[str, tuple[Opener, int]] = {
        "plain": (asyncio.open_connection, plain),
        "aiocoloc": (aiocoloc.open_connection, coloc),  # the default policy: "auto"
    }
    for open_connection, port in contenders.values():
        for _ in range(20):
            await short_connection(open_connection, port)
    block = 4 * seconds / SHORT_ROUNDS  # 4 x --seconds of each contender in all
    upgrades = aiocoloc.stats()["upgrades"]
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    p50s: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(SHORT_ROUNDS):
        order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in order:
            rate, p50 = await short_block(*contenders[name], block)
            rates[name].append(rate)
            p50s[name].append(p50)
    row["short_upgrades"] = aiocoloc.stats()["upgrades"] - upgrades  # "auto": none expected
    for name in contenders:
        row[f"short_{name}_conn_per_s"] = statistics.median(rates[name])
        row[f"short_{name}_p50_us"] = statistics.median(p50s[name]) * 1e6
    row["short_ratio"] = statistics.median(
        c / p for c, p in zip(rates["aiocoloc"], rates["plain"], strict=True)
    )
    return row


def run_connection_cells(loop_name: str, seconds: float) -> dict[str, Any]:
    children = []
    try:
        ports = []
        for kind in ("conn-plain", "conn-coloc"):
            child, line = spawn(kind, loop_name, [])
            children.append(child)
            ports.append(int(line))
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            return runner.run(asyncio.wait_for(connection_cells(*ports, seconds), 300))
    finally:
        for child in children:
            stop(child)


# --- running it all ------------------------------------------------------------------------


def measure(
    loops: list[str], seconds: float, progress: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, Any] = {}
    connections: dict[str, Any] = {}
    for loop_name in loops:
        for kind in KINDS:
            key = f"{kind}/{loop_name}"
            row: dict[str, Any] = {}
            for size in STREAM_SIZES:
                progress(f"{key} stream {size} B")
                cell = run_cell(kind, loop_name, lambda c, s=size: stream_cell(c, s, seconds))
                row[f"stream_{size}"] = cell["bytes_per_s"]
                row[f"cpu_per_gb_{size}"] = cell["cpu_s_per_gb"]
            if kind in STREAM_ONLY:
                results[key] = row
                continue
            for size in RR_SIZES:
                progress(f"{key} ping-pong {size} B")
                row[f"rr_{size}"] = run_cell(
                    kind, loop_name, lambda c, s=size: rr_cell(c, s, seconds)
                )
            progress(f"{key} low-rate ping")
            row["lowrate"] = run_cell(kind, loop_name, lambda c: rr_cell(c, 64, seconds, 0.001))
            progress(f"{key} idle")
            row["idle_cpu"] = run_cell(kind, loop_name, lambda c: idle_cell(c, 1.0))
            results[key] = row
        progress(f"connections/{loop_name}: set-up and short-lived")
        connections[loop_name] = run_connection_cells(loop_name, seconds)
    return results, connections


def ratios(
    results: dict[str, Any], connections: dict[str, Any], loops: list[str]
) -> dict[str, Any]:
    """Each shm cell against the best socket peer (any kind, any loop); the
    connection cells against plain TCP on the same loop."""
    peers = [results[f"{k}/{lp}"] for k in ("tcp", "uds") for lp in loops]
    out: dict[str, Any] = {}
    for lp in loops:
        shm, as_run = results[f"shm/{lp}"], results[f"shm-as-run/{lp}"]
        for size in STREAM_SIZES:
            best = max(p[f"stream_{size}"] for p in peers)
            out[f"{lp}/stream_{size}"] = shm[f"stream_{size}"] / best
            out[f"{lp}/stream_{size}_as_run"] = as_run[f"stream_{size}"] / best
        for size in RR_SIZES:
            best = min(p[f"rr_{size}"]["p50_us"] for p in peers)
            out[f"{lp}/rr_{size}_p50"] = shm[f"rr_{size}"]["p50_us"] / best
        best = min(p["lowrate"]["p50_us"] for p in peers)
        out[f"{lp}/lowrate_p50"] = shm["lowrate"]["p50_us"] / best
        tcp = results[f"tcp/{lp}"]
        for size in CPU_SIZES:  # CPU per GB moved against TCP's, on the same loop
            out[f"{lp}/cpu_per_gb_{size}"] = shm[f"cpu_per_gb_{size}"] / tcp[f"cpu_per_gb_{size}"]
        conn = connections[lp]
        out[f"{lp}/setup_p50"] = conn["shm_setup_p50_us"] / conn["tcp_setup_p50_us"]
        out[f"{lp}/setup_cold_p50"] = conn["shm_cold_setup_p50_us"] / conn["tcp_setup_p50_us"]
        out[f"{lp}/short_conn_per_s"] = conn["short_ratio"]
        out[f"{lp}/idle_conns_per_64mib_pool"] = conn["idle_conns_per_64mib_pool"]  # a count
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.serve:
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            runner.run(serve(args.serve, rest))
        return 0

    from rich.console import Console

    loops = args.loops.split(",")
    console = Console(stderr=True)
    try:
        with console.status("measuring") as status:
            results, connections = measure(
                loops, args.seconds, lambda what: status.update(f"measuring {what}")
            )
    except NotUpgraded as exc:
        console.print(f"[bold red]the shm contender never upgraded to shared memory:[/] {exc}")
        return 1
    rel = ratios(results, connections, loops)
    marks = mark(rel)
    print_report(results, connections, rel, marks)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "streams",
                    "results": results,
                    "connections": connections,
                    "ratios": rel,
                    "targets": marks,
                    "broken": sorted(cell for cell, m in marks.items() if not m["met"]),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
