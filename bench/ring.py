#!/usr/bin/env python3
"""Ring throughput next to memcpy and a Unix socket pair, in one run.

For each write size (64 B, 1 KiB, 64 KiB, 1 MiB):
  memcpy      one process copies a buffer of that size into another (Python's
              buffer copy: the physical limit for a copy made from Python)
  ring 1p     one process writes into a ring and reads it back
  ring 2p     a producer process and a consumer process, ring in POSIX shm
  unix 2p     the same two processes over a Unix stream socketpair

Each cell runs --repeat times, interleaved with the others, and the median is
kept.  Usage: bench/ring.py [--seconds 0.5] [--repeat 3] [--sizes 64,1024,...] [--json]
Compare ratios within one run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import posix_ipc

from aiocoloc import ring

DEFAULT_SIZES = [64, 1024, 64 * 1024, 1024 * 1024]
SHM_PREFIX = "/aiocoloc-bench-"


def human(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


RING_CAPACITY = 4 << 20


def ring_capacity(size: int) -> int:
    """4 MiB, or twice the write size: a ring much smaller than the L2 cache
    keeps its lines in the producer's cache when the consumer reads them,
    and cross-core snoops cost more than L3 hits (see README)."""
    cap = RING_CAPACITY
    while cap < 2 * size:
        cap *= 2
    return cap


class Idle:
    """Bounded, adaptive waiting for a peer: spin briefly, then yield, then sleep."""

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def wait(self) -> None:
        self.count += 1
        if self.count > 1024:
            time.sleep(min(1e-3, 1e-6 * (self.count - 1024)))
        elif self.count > 64:
            os.sched_yield()


# --- in-process cells --------------------------------------------------------


def bench_memcpy(size: int, seconds: float) -> float:
    src, dst = bytearray(os.urandom(size)), bytearray(size)
    s, d = memoryview(src), memoryview(dst)
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            d[:] = s
        n += 64
        now = time.perf_counter()
        if now >= deadline:
            return n * size / (now - start)


def bench_ring_one_process(size: int, seconds: float) -> float:
    cap = ring_capacity(size)
    region = mmap.mmap(-1, ring.ring_size(cap))
    ring.format_ring(region, cap)
    producer, consumer = ring.RingProducer(region), ring.RingConsumer(region)
    src, dst = os.urandom(size), bytearray(size)
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            producer.write(src)
            consumer.readinto(dst)
        n += 64
        now = time.perf_counter()
        if now >= deadline:
            break
    producer.release()
    consumer.release()
    region.close()
    return n * size / (now - start)


# --- two-process cells: this script is also the child ------------------------


def child_ring_consumer(shm_name: str, size: int) -> None:
    shm = posix_ipc.SharedMemory(shm_name)
    region = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    consumer = ring.RingConsumer(region)
    dst = bytearray(max(size, 64 * 1024))
    total, idle, start = 0, Idle(), 0.0
    while True:
        got = consumer.readinto(dst)
        if got is None:
            idle.wait()
            continue
        if got == 0:
            break
        if not total:
            start = time.perf_counter()
        total += got
        idle.reset()
    elapsed = time.perf_counter() - start
    consumer.release()
    region.close()
    print(json.dumps({"bytes": total, "seconds": elapsed}), flush=True)


def child_unix_reader(fd: int, size: int) -> None:
    sock = socket.socket(fileno=fd)
    dst = bytearray(max(size, 64 * 1024))
    total, start = 0, 0.0
    while True:
        got = sock.recv_into(dst)
        if not got:
            break
        if not total:
            start = time.perf_counter()
        total += got
    elapsed = time.perf_counter() - start
    print(json.dumps({"bytes": total, "seconds": elapsed}), flush=True)


def _spawn_child(args: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def _child_rate(child: subprocess.Popen[str]) -> float:
    out, _ = child.communicate(timeout=120)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child failed with {child.returncode}")
    result = json.loads(out)
    return float(result["bytes"]) / max(float(result["seconds"]), 1e-9)


def bench_ring_two_processes(size: int, seconds: float) -> float:
    cap = ring_capacity(size)
    name = f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}"
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=ring.ring_size(cap))
    try:
        region = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        ring.format_ring(region, cap)
        producer = ring.RingProducer(region)
        child = _spawn_child(["--child-ring", name, str(size)])
        src = os.urandom(size)
        write_all = producer.write_all
        idle = Idle()
        deadline = time.perf_counter() + seconds
        try:
            while time.perf_counter() < deadline:
                for _ in range(16):
                    if not write_all(src):
                        idle.reset()
                        while not write_all(src):
                            idle.wait()
            producer.close()
            return _child_rate(child)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            producer.release()
            region.close()
    finally:
        shm.unlink()


def bench_unix_two_processes(size: int, seconds: float) -> float:
    parent, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = _spawn_child(
        ["--child-unix", str(theirs.fileno()), str(size)], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    src = os.urandom(size)
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(16):
                parent.sendall(src)
        parent.shutdown(socket.SHUT_WR)
        return _child_rate(child)
    finally:
        parent.close()
        if child.poll() is None:
            child.kill()
            child.wait()


# --- the run -------------------------------------------------------------------

CELLS = {
    "memcpy": bench_memcpy,
    "ring_1p": bench_ring_one_process,
    "ring_2p": bench_ring_two_processes,
    "unix_2p": bench_unix_two_processes,
}


def run(sizes: list[int], seconds: float, repeat: int, progress: Any = None) -> dict[str, Any]:
    """Each cell ``repeat`` times, interleaved, keeping the median."""
    results: dict[str, Any] = {}
    for size in sizes:
        samples: dict[str, list[float]] = {name: [] for name in CELLS}
        for _ in range(repeat):
            for name, cell in CELLS.items():
                if progress is not None:
                    progress(f"{name} at {human(size)}")
                samples[name].append(cell(size, seconds))
        row = {name: statistics.median(values) for name, values in samples.items()}
        row["ring_2p_vs_memcpy"] = row["ring_2p"] / row["memcpy"]
        row["ring_2p_vs_unix"] = row["ring_2p"] / row["unix_2p"]
        results[str(size)] = row
    return results


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    row = results.get(str(64 * 1024))
    if row is None:
        return {}
    return {
        "ring_2p_vs_memcpy_64k": round(row["ring_2p_vs_memcpy"], 3),
        "ring_2p_vs_unix_64k": round(row["ring_2p_vs_unix"], 3),
        "target_memcpy_0.4_met": row["ring_2p_vs_memcpy"] >= 0.4,
        "target_unix_4x_met": row["ring_2p_vs_unix"] >= 4.0,
    }


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"throughput, MB/s ({ring.IMPLEMENTATION} ring, capacity {human(RING_CAPACITY)})"
    )
    for column in (
        "write size",
        "memcpy",
        "ring 1p",
        "ring 2p",
        "unix 2p",
        "ring 2p / memcpy",
        "ring 2p / unix",
    ):
        table.add_column(column, justify="right")
    for size, row in results.items():
        table.add_row(
            human(int(size)),
            *(f"{row[k] / 1e6:,.0f}" for k in ("memcpy", "ring_1p", "ring_2p", "unix_2p")),
            f"{row['ring_2p_vs_memcpy']:.2f}",
            f"{row['ring_2p_vs_unix']:.2f}x",
        )
    Console().print(table)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.5, help="per cell run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median kept)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--json", action="store_true", help="final line: JSON results")
    parser.add_argument("--child-ring", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-unix", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ring:
        child_ring_consumer(args.child_ring[0], int(args.child_ring[1]))
        return 0
    if args.child_unix:
        child_unix_reader(*args.child_unix)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("measuring") as status:
        results = run(
            sizes, args.seconds, args.repeat, lambda what: status.update(f"measuring {what}")
        )
    print_table(results)
    summary = verdicts(results)
    for key, value in summary.items():
        print(f"{key}: {value}")
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "ring",
                    "implementation": ring.IMPLEMENTATION,
                    "bytes_per_second": results,
                    **summary,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
