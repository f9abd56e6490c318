"""Runs inside a QEMU guest for ``bench/vms.py``: one side of the bench.

    python -m bench._vm_guest server '{json config}'
    python -m bench._vm_guest client '{json config}'

(from the repository, as a module: run as a script, bench/discovery.py would
shadow the discovery package)

Both start this guest's discovery sidecar (``--pool auto``: the guest's
ivshmem device, which maps the host pool).  The server runs an aiocoloc echo
server (``upgrade="always"``) and a plain asyncio server on another port,
both speaking the protocol below, until a client sends ``Q``.  The client
measures every cell over both paths and prints the results.  Every line for
the host starts with ``VMB `` and holds one JSON object; every wait has a
timeout, so a guest never outlives its ``deadline``.

Protocol, one connection carries any number of requests, each a 17-byte
header ``kind (1) | size (8, big endian) | count (8)``:
  S  the client sends ``size`` bytes; the server counts them and acks with
     the count (8 bytes) once it has them all
  E  ``count`` round trips: the client sends ``size`` bytes, the server
     echoes them
  Q  the server reports and exits
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiocoloc
from discovery.client import SidecarClient
from tests.qemu.guest_vm_node import (  # the same sidecar as the tests
    API,
    sidecar_ready,
    start_sidecar,
)

HEADER = 17
STARTED = time.monotonic()
#: Rounds and bytes each path gets, untimed, before its cells: TCG translates
#: code on its first run, and the first pass over a path would pay for it.
WARMUP_ROUNDS = 10
#: Blocks each ping-pong cell is cut into, the paths taking turns.
RR_BLOCKS = 4
WARMUP_BYTES = 1 << 20
T = TypeVar("T")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Failed(Exception):
    """What the guest could not do (reported, and the exit status is 1)."""


def report(**fields: Any) -> None:
    print("VMB " + json.dumps(fields), flush=True)


def since_start() -> float:
    return round(time.monotonic() - STARTED, 3)


def header(kind: bytes, size: int = 0, count: int = 0) -> bytes:
    return kind + size.to_bytes(8, "big") + count.to_bytes(8, "big")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    """Poll ``check`` until it is true; ``Failed`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if await check():
                return
        except Exception as exc:  # the sidecar not up yet, say
            last = exc
        if time.monotonic() > deadline:
            raise Failed(f"timed out waiting for {what} (last error: {last!r})")
        await asyncio.sleep(0.2)


def state(writer: asyncio.StreamWriter) -> dict[str, Any]:
    info: dict[str, Any] | None = writer.transport.get_extra_info("aiocoloc")
    return dict(info or {})


# --- the server -------------------------------------------------------------------------


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Answer requests until EOF; True when the client asked the server to quit."""
    while True:
        try:
            head = await reader.readexactly(HEADER)
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        kind, size, count = (
            head[:1],
            int.from_bytes(head[1:9], "big"),
            int.from_bytes(head[9:], "big"),
        )
        if kind == b"S":
            left = size
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    return False
                left -= len(chunk)
            writer.write(size.to_bytes(8, "big"))
            await writer.drain()
        elif kind == b"E":
            for _ in range(count):
                writer.write(await reader.readexactly(size))
                await writer.drain()
        elif kind == b"Q":
            return True
        else:
            raise Failed(f"unknown request {head!r}")


async def serve(cfg: dict[str, Any]) -> None:
    quit_ = asyncio.Event()
    served: list[dict[str, Any]] = []

    def handler(path: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if await handle(reader, writer):
                    quit_.set()
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                served.append({"path": path, "error": repr(exc)})
            finally:
                if path == "shm":
                    info = state(writer)
                    served.append({k: info.get(k) for k in ("mode", "rx_mode", "pool", "doorbell")})
                writer.close()

        return run

    coloc = await aiocoloc.start_server(
        handler("shm"), cfg["ip"], cfg["shm_port"], upgrade="always"
    )
    plain = await asyncio.start_server(handler("tcp"), cfg["ip"], cfg["tcp_port"])
    report(phase="listening", t=since_start())
    async with coloc, plain:
        await asyncio.wait_for(quit_.wait(), cfg["deadline"] - since_start())
        # The client closed its connections before it sent Q: let their
        # handlers see EOF and record their final states.
        await asyncio.sleep(1.0)
    report(
        phase="served",
        t=since_start(),
        shm_connections=sum(1 for s in served if s.get("mode") == "shm"),
        connections=served,
    )


# --- the client -------------------------------------------------------------------------


async def upgraded(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Until both directions of an aiocoloc connection are on shared memory."""
    deadline = time.perf_counter() + timeout
    while True:
        info = state(writer)
        if info.get("mode") == "shm" and info.get("rx_mode") == "shm":
            return
        if info.get("fallback_reason") is not None or time.perf_counter() > deadline:
            raise Failed(f"the connection did not reach shm: {info}")
        # Polled, not spun: the guest has one CPU, and the sidecar may need it.
        await asyncio.sleep(0.0005)


def quantiles(times: list[float]) -> dict[str, float]:
    """p10/p50/p90/p99 of round trips, in microseconds."""
    ordered = sorted(times)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6

    return {
        "p10_us": at(0.10),
        "p50_us": statistics.median(ordered) * 1e6,
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "rounds": len(ordered),
    }


def retransmitted() -> int:
    """TCP segments this guest's kernel has retransmitted so far."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    names, values = (line for line in lines if line[0] == "Tcp:")
    return int(values[names.index("RetransSegs")])


class Client:
    """The measuring side: connections to both of the server's ports."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.server = cfg["server_ip"]

    def limit(self, awaitable: Awaitable[T]) -> Awaitable[T]:
        """Every wait is bounded by the guest's deadline."""
        return asyncio.wait_for(awaitable, max(1.0, self.cfg["deadline"] - since_start()))

    async def open(self, path: str) -> Streams:
        if path == "tcp":
            return await asyncio.open_connection(self.server, self.cfg["tcp_port"])
        reader, writer = await aiocoloc.open_connection(
            self.server, self.cfg["shm_port"], upgrade="always"
        )
        await upgraded(writer, self.cfg["upgrade_timeout"])
        return reader, writer

    async def setup(self, path: str) -> float:
        """Seconds from connecting to the end of the first 64 B echo (over
        shm both ways, for the shm path)."""
        t0 = time.perf_counter()
        reader, writer = await self.open(path)
        writer.write(header(b"E", 64, 1) + bytes(64))
        await reader.readexactly(64)
        elapsed = time.perf_counter() - t0
        if path == "shm":
            info = state(writer)
            if (info["mode"], info["rx_mode"]) != ("shm", "shm"):
                raise Failed(f"a set-up echo did not go over shm: {info}")
        writer.close()
        await writer.wait_closed()
        return elapsed

    @staticmethod
    async def stream(streams: Streams, size: int, write: int) -> float:
        """Bytes per second one way: ``size`` bytes in ``write``-byte writes
        (write + drain each), timed until the server's ack."""
        reader, writer = streams
        chunk = os.urandom(write)
        t0 = time.perf_counter()
        writer.write(header(b"S", size))
        for offset in range(0, size, write):
            writer.write(chunk[: min(write, size - offset)])
            await writer.drain()
        got = int.from_bytes(await reader.readexactly(8), "big")
        elapsed = time.perf_counter() - t0
        if got != size:
            raise Failed(f"the server counted {got} bytes of {size}")
        return size / elapsed

    @staticmethod
    async def ping_pong(streams: Streams, size: int, rounds: int) -> list[float]:
        """Round trips of ``size`` bytes, seconds each."""
        reader, writer = streams
        message = os.urandom(size)
        writer.write(header(b"E", size, rounds))
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            writer.write(message)
            await writer.drain()
            await reader.readexactly(size)
            times.append(time.perf_counter() - t0)
        return times

    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        paths = ("tcp", "shm")
        result: dict[str, Any] = {}

        # Set-up: the first connection of each path alone (for shm it maps the
        # pool through the ivshmem device), then the two paths alternating.
        first = {path: await self.limit(self.setup(path)) for path in paths}
        samples: dict[str, list[float]] = {path: [] for path in paths}
        for i in range(cfg["setups"]):
            for path in paths if i % 2 == 0 else paths[::-1]:
                samples[path].append(await self.limit(self.setup(path)))
        for path in paths:
            result[path] = {
                "setup_first_ms": first[path] * 1e3,
                "setup_p50_ms": statistics.median(samples[path]) * 1e3,
                "setup_ms": [round(s * 1e3, 3) for s in samples[path]],
            }
        report(phase="setup", t=since_start())

        # Steady state: one connection per path, the shm one on shm both ways
        # before anything is timed; each cell once per path, the order
        # alternating from cell to cell.
        conns = {path: await self.limit(self.open(path)) for path in paths}
        for path in paths:
            await self.limit(self.stream(conns[path], WARMUP_BYTES, cfg["write"]))
        rates: dict[str, list[float]] = {path: [] for path in paths}
        retrans = dict.fromkeys(paths, 0)
        for i in range(cfg["stream_repeats"]):
            for path in paths if i % 2 == 0 else paths[::-1]:
                before = retransmitted()
                rate = await self.limit(self.stream(conns[path], cfg["size"], cfg["write"]))
                retrans[path] += retransmitted() - before
                rates[path].append(rate / 1e6)
        for path in paths:
            result[path]["stream_mb_s"] = statistics.median(rates[path])
            result[path]["stream_mb_s_runs"] = [round(r, 2) for r in rates[path]]
            # TCP segments this guest resent during the path's stream cells
            # (for shm, its control connection's): a stall on the emulated
            # link shows here.
            result[path]["stream_tcp_retrans"] = retrans[path]
        report(phase="stream", t=since_start())
        # Ping-pong in blocks, the paths taking turns, so that a slow spell
        # of the (shared) host falls on both.
        blocks = max(1, min(RR_BLOCKS, cfg["rounds"] // 10))
        for size in cfg["rr_sizes"]:
            times: dict[str, list[float]] = {path: [] for path in paths}
            for path in paths:  # untimed
                await self.limit(self.ping_pong(conns[path], size, WARMUP_ROUNDS))
            for b in range(blocks):
                rounds = cfg["rounds"] // blocks + (b < cfg["rounds"] % blocks)
                for path in paths if b % 2 == 0 else paths[::-1]:
                    times[path] += await self.limit(self.ping_pong(conns[path], size, rounds))
            for path in paths:
                result[path][f"rr_{size}"] = quantiles(times[path])
            report(phase=f"rr_{size}", t=since_start())
        info = state(conns["shm"][1])
        result["shm"]["state"] = {
            k: info.get(k) for k in ("mode", "rx_mode", "pool", "doorbell", "fallback_reason")
        }
        for _, writer in conns.values():
            writer.close()
            await writer.wait_closed()
        return result

    async def quit_server(self) -> None:
        _, writer = await self.limit(self.open("tcp"))
        writer.write(header(b"Q"))
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def client(cfg: dict[str, Any]) -> None:
    server, port = cfg["server_ip"], cfg["shm_port"]

    async def advertised() -> bool:
        async with SidecarClient(API, timeout=2) as sidecar:
            answer = await sidecar.colocated(f"{server}:{port}")
        return any("=tcp:" in e for e in answer.endpoints)

    await until(advertised, "the server's advertised endpoints", cfg["deadline"] / 2)
    report(phase="peer", t=since_start())
    measuring = Client(cfg)
    try:
        result = await measuring.run()
    finally:
        # The server exits on Q, also when this side failed.
        try:
            await measuring.quit_server()
        except Exception as exc:
            report(phase="quit_failed", error=repr(exc))
    report(phase="result", t=since_start(), result=result)


async def main(role: str, cfg: dict[str, Any]) -> int:
    # aiocoloc's warnings (a reaped member, a pipe that failed) on the
    # console, where the host shows them when a guest fails.
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    node = f"vm-{cfg['ip'].rsplit('.', 1)[1]}"
    sidecar = start_sidecar(node, cfg["ip"], cfg["key"], cfg.get("server_ip"))
    status = 0
    try:
        await until(sidecar_ready, "the sidecar", cfg["deadline"] / 2)
        report(phase="sidecar", t=since_start())
        await asyncio.wait_for(
            serve(cfg) if role == "server" else client(cfg), cfg["deadline"] - since_start()
        )
    except TimeoutError:
        report(phase="failed", t=since_start(), error=f"the deadline ({cfg['deadline']} s) passed")
        status = 1
    except (Failed, OSError, asyncio.IncompleteReadError) as exc:
        report(phase="failed", t=since_start(), error=f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        sidecar.terminate()
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()
        if status or sidecar.returncode not in (0, -15):
            print(Path(f"/run/{node}.log").read_text(errors="replace")[-3000:], flush=True)
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]))))
