"""The connection cells of ``bench/streams.py``, against plain TCP on the
same loop: set-up time (warm and cold), what an idle upgraded connection
holds, and short-lived connections one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiocoloc
from aiocoloc.connect.colocation import local_pools
from bench._streams_cells import Streams, upgraded
from bench._streams_server import LOOPS, REPLY, REQUEST, spawn, stop

__all__ = ["run_connection_cells"]

#: Idle upgraded connections opened at once to measure memory per connection.
IDLE_CONNECTIONS = 50
#: Short-lived connections: alternating blocks of each contender.
SHORT_ROUNDS = 10
Opener = Callable[..., Awaitable[Streams]]


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
    """Connect, one request, its 1 KiB reply, close."""
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
    """The connection cells on a new loop of ``loop_name``, against a
    server process of each (plain asyncio, aiocoloc)."""
    children = []
    try:
        ports = []
        for kind in ("conn-plain", "conn-coloc"):
            child, line = spawn(kind, loop_name, [])
            children.append(child)
            ports.append(int(line))
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            return runner.run(asyncio.wait_for(connection_cells(ports[0], ports[1], seconds), 300))
    finally:
        for child in children:
            stop(child)
