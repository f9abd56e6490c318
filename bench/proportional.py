#!/usr/bin/env python3
"""Proportional allocation in a shared pool: 16 pipes between two processes.

(a) 1 hot pipe + 15 idle: the hot pipe's share of the pool and its throughput
    (1 MiB writes) with elastic pipes, next to a static equal split (every
    pipe 1/16 of the pool) and a static pipe as large as the whole pool.
(b) 4 pipes offered 1:2:4:8 (rate-limited) + 12 idle: their capacity shares
    next to the ideal proportions.
(c) the hot pipe goes idle: milliseconds until its slices are back in the pool.

Throughout, the pool is checked for over-commitment (a slice in two pipes, a
layout naming a slice its pipe does not own).

(a) runs --repeat times, interleaved, and keeps the median run of each kind.
Usage: bench/proportional.py [--seconds 1.0] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from aiocoloc.shm import MemfdSegment, PipeHandle, Pool, PoolConfig
from aiocoloc.shm.allocation import proportional_targets
from aiocoloc.shm.elastic import ElasticConfig, ElasticProducer

PIPES = 16
POOL_BYTES = 8 << 20
SLICE = 64 * 1024
WRITE = 1 << 20
CONFIG = PoolConfig(slice_size=SLICE, max_pipes=PIPES, max_slices_per_pipe=256, lease=10)


# --- the consumer process ------------------------------------------------------------


def child(fd: int) -> None:
    """Drain every pipe named on stdin until each reaches EOF; report byte counts."""
    pool = Pool.attach(MemfdSegment.from_fd(fd))
    print(json.dumps({"slot": pool.slot}), flush=True)
    handles = [PipeHandle(*map(int, sys.stdin.readline().split())) for _ in range(PIPES)]
    consumers = [pool.pipe_consumer(h) for h in handles]
    buf = bytearray(WRITE)
    done = [False] * PIPES
    counts = [0] * PIPES
    idle = 0
    while not all(done):
        progress = False
        for i, consumer in enumerate(consumers):
            if done[i]:
                continue
            got = consumer.readinto(buf)
            if got == 0:
                done[i] = True
            elif got:
                counts[i] += got
                progress = True
        if progress:
            idle = 0
        else:
            idle += 1
            if idle > 200:
                time.sleep(min(2e-4, 1e-6 * idle))
            elif idle > 20:
                os.sched_yield()
    for consumer in consumers:
        consumer.release()
    print(json.dumps({"bytes": counts}), flush=True)
    pool.close()


# --- the producer side ------------------------------------------------------------------


@dataclass
class Setup:
    pool: Pool
    child: subprocess.Popen[str]
    producers: list[ElasticProducer]
    violations: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Record any over-commitment visible now."""
        owners = self.pool.slice_owners()
        for p in self.producers:
            for index in p.end.slices:
                if owners[index] != p.handle.slot:
                    self.violations.append(
                        f"pipe {p.handle.slot} uses slice {index} owned by {owners[index]}"
                    )
        if sum(1 for o in owners if o >= 0) > self.pool.geometry.slice_count:
            self.violations.append("more slices owned than exist")

    def owned(self, i: int) -> int:
        return self.pool.slice_owners().count(self.producers[i].handle.slot)

    def finish(self) -> list[int]:
        for p in self.producers:
            p.close()
        assert self.child.stdout is not None
        counts: list[int] = json.loads(self.child.stdout.readline())["bytes"]
        self.child.wait(timeout=60)
        self.pool.close()
        return counts


def setup(
    initial: list[int], mins: list[int], maxs: list[int], config: ElasticConfig | None = None
) -> Setup:
    pool = Pool.create(MemfdSegment.create(POOL_BYTES), CONFIG)
    fd = pool.segment.fd
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", str(fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(fd,),
    )
    assert proc.stdout is not None and proc.stdin is not None
    consumer = json.loads(proc.stdout.readline())["slot"]
    producers = []
    for first, lo, hi in zip(initial, mins, maxs, strict=True):
        handle = pool.create_pipe(pool.slot, consumer, min_slices=lo, max_slices=hi, initial=first)
        proc.stdin.write(f"{handle.slot} {handle.generation}\n")
        producers.append(ElasticProducer(pool, handle, config))
    proc.stdin.flush()
    return Setup(pool, proc, producers)


def hot_phase(kind: str, seconds: float) -> dict[str, float]:
    """One hot pipe streaming 1 MiB writes, 15 idle ones."""
    count = Pool.create(MemfdSegment.create(POOL_BYTES), CONFIG)
    total = count.geometry.slice_count
    count.close()
    idle_min = 1
    if kind == "static_equal":
        each = total // PIPES
        s = setup([each] * PIPES, [each] * PIPES, [each] * PIPES)
    elif kind == "static_full":
        big = total - (PIPES - 1) * idle_min
        s = setup([big] + [idle_min] * 15, [big] + [idle_min] * 15, [big] + [idle_min] * 15)
    else:
        s = setup([idle_min] * PIPES, [idle_min] * PIPES, [total] * PIPES)
    hot = s.producers[0]
    data = memoryview(bytes(WRITE))
    warmup = time.monotonic() + 0.4
    start = end = 0.0
    sent = 0
    idle = 0
    last_check = 0.0
    while True:
        now = time.monotonic()
        if now >= warmup and not start:
            start, sent = now, 0
        if start and now - start >= seconds:
            end = now
            break
        n = hot.write(data)
        sent += n
        if n:
            idle = 0
        else:
            idle += 1
            if idle > 50:
                os.sched_yield()
        for p in s.producers[1:]:
            p.maybe_tick()
        if now - last_check > 0.02:
            s.check()
            last_check = now
    share = s.owned(0) / total
    s.finish()
    return {
        "bytes_per_second": sent / (end - start),
        "share": share,
        "violations": len(s.violations),
    }


def proportional_phase(seconds: float) -> dict[str, Any]:
    """Four pipes offered 1:2:4:8 (rate-limited), twelve idle."""
    count = Pool.create(MemfdSegment.create(POOL_BYTES), CONFIG)
    total = count.geometry.slice_count
    count.close()
    s = setup([1] * PIPES, [1] * PIPES, [total] * PIPES, ElasticConfig(interval=0.05))
    loads = [1, 2, 4, 8]
    base = 20e6  # bytes per second for load 1
    chunk = memoryview(bytes(64 * 1024))
    sent = [0.0] * 4
    start = time.monotonic()
    samples: list[list[int]] = []
    last_check = start
    while True:
        now = time.monotonic()
        elapsed = now - start
        if elapsed >= seconds + 1.0:
            break
        for i, load in enumerate(loads):
            while sent[i] < base * load * elapsed:
                n = s.producers[i].write(chunk)
                sent[i] += n
                if n < len(chunk):
                    break
        for p in s.producers:
            p.maybe_tick()
        if now - last_check > 0.02:
            s.check()
            last_check = now
            if elapsed > 1.0:  # converged: sample the capacities
                samples.append([s.owned(i) for i in range(4)])
        time.sleep(0.0005)
    s.finish()
    mean = [sum(col) / len(samples) for col in zip(*samples, strict=True)]
    ideal = proportional_targets(
        [float(x) for x in loads] + [0.0] * 12, [1] * PIPES, [total] * PIPES, total
    )[:4]
    shares = [m / sum(mean) for m in mean]
    ideal_shares = [x / sum(ideal) for x in ideal]
    error = max(abs(a - b) / b for a, b in zip(shares, ideal_shares, strict=True))
    return {
        "slices": mean,
        "ideal_slices": ideal,
        "shares": shares,
        "ideal_shares": ideal_shares,
        "error": error,
        "violations": len(s.violations),
    }


def release_phase() -> dict[str, float]:
    """A hot pipe goes idle: how long until its slices are back."""
    count = Pool.create(MemfdSegment.create(POOL_BYTES), CONFIG)
    total = count.geometry.slice_count
    count.close()
    s = setup([1] * PIPES, [1] * PIPES, [total] * PIPES)
    hot = s.producers[0]
    data = memoryview(bytes(WRITE))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        hot.write(data)
        for p in s.producers[1:]:
            p.maybe_tick()
    peak = s.owned(0)
    stopped = time.monotonic()
    released = None
    while time.monotonic() - stopped < 5.0:
        for p in s.producers:
            p.maybe_tick()
        s.check()
        if s.owned(0) <= 1:
            released = time.monotonic() - stopped
            break
        time.sleep(0.001)
    s.finish()
    return {
        "peak_slices": peak,
        "release_ms": 1000 * released if released is not None else -1.0,
        "violations": len(s.violations),
    }


def median_run(rows: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median throughput (violations summed over all runs)."""
    ordered = sorted(rows, key=lambda r: r["bytes_per_second"])
    middle = dict(ordered[len(ordered) // 2])
    middle["violations"] = sum(r["violations"] for r in rows)
    return middle


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per measured run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of (a), interleaved; median kept"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    with console.status("measuring") as status:
        runs: dict[str, list[dict[str, float]]] = {}
        for round_ in range(args.repeat):
            for kind in ("elastic", "static_equal", "static_full"):
                status.update(f"(a) hot pipe, {kind}, run {round_ + 1}/{args.repeat}")
                runs.setdefault(kind, []).append(hot_phase(kind, args.seconds))
        hot = {kind: median_run(rows) for kind, rows in runs.items()}
        status.update("(b) loads 1:2:4:8")
        prop = proportional_phase(args.seconds)
        status.update("(c) release after idle")
        release = release_phase()

    out = Console()
    table = Table(title="(a) one hot pipe, 15 idle, 1 MiB writes")
    for column in ("pipes", "hot pipe's share of the pool", "hot pipe MB/s", "vs static equal"):
        table.add_column(column, justify="right")
    for kind, row in hot.items():
        table.add_row(
            kind.replace("_", " "),
            f"{row['share']:.1%}",
            f"{row['bytes_per_second'] / 1e6:,.0f}",
            f"{row['bytes_per_second'] / hot['static_equal']['bytes_per_second']:.2f}x",
        )
    out.print(table)
    table = Table(title="(b) offered loads 1:2:4:8")
    for column in ("load", "slices (mean)", "ideal slices", "share", "ideal share"):
        table.add_column(column, justify="right")
    for i, load in enumerate([1, 2, 4, 8]):
        table.add_row(
            str(load),
            f"{prop['slices'][i]:.1f}",
            str(prop["ideal_slices"][i]),
            f"{prop['shares'][i]:.3f}",
            f"{prop['ideal_shares'][i]:.3f}",
        )
    out.print(table)
    out.print(
        f"(c) idle pipe returned {release['peak_slices']} slices in {release['release_ms']:.0f} ms"
    )
    violations = sum(int(r["violations"]) for r in (*hot.values(), prop, release))
    summary = {
        "hot_share": round(hot["elastic"]["share"], 4),
        "hot_speedup_vs_static_equal": round(
            hot["elastic"]["bytes_per_second"] / hot["static_equal"]["bytes_per_second"], 3
        ),
        "hot_vs_static_full": round(
            hot["elastic"]["bytes_per_second"] / hot["static_full"]["bytes_per_second"], 3
        ),
        "proportional_error": round(prop["error"], 4),
        "release_ms": round(release["release_ms"], 1),
        "overcommitted": violations > 0,
    }
    for key, value in summary.items():
        out.print(f"{key}: {value}")
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "proportional",
                    **summary,
                    "hot": hot,
                    "proportional": prop,
                    "release": release,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
