#!/usr/bin/env python3
"""Membership on loopback: the embedded SWIM engine vs HashiCorp Serf.

For each cluster size N (8, 16, 32, 64 by default) and each engine, N
``aiocoloc-discoveryd`` daemons run at the same ``--profile`` (default
``local``; Serf maps our ``host`` to its ``local``), each on a loopback
address of its own (127.x.y.z, gossip port 7946), and the bench follows
every daemon's view through its local API (a ``subscribe`` feed over a
``members()`` snapshot, every change stamped when it arrives).  In one run,
with k = --trials (2, or fewer if N is too small; 3 makes the run ~25% longer):

  join     N-k members start (all join the first) and wait until they agree
           on who is in; then the last k join the first, one at a time:
           seconds from spawning each until every member's API shows all
           alive, median of the k (and range); ``ready``: until the joiner
           serves its API, a part of that.  A broadcast that misses a member
           reaches it at the next push/pull (every 15 s at ``local``), so a
           join now and then takes that long, with either engine
  idle     payload bytes each member sends per second (UDP + TCP; IP and
           UDP/TCP headers not counted) over --idle-seconds of steady state,
           the mean over the members (and the busiest one's); CPU per member
           (daemon + agent) over the same time.  embedded: ``udp_out_bytes +
           tcp_out_bytes`` of ``engine_stats`` in the daemon's ``status``;
           serf: memberlist's own counters (``memberlist.udp.sent`` +
           ``memberlist.tcp.sent``), which each agent reports to the bench
           over statsd (Serf's RPC ``stats`` has no byte counts, and
           ``/proc/<pid>/io`` does not count ``sendto``)
  stop     one member is stopped (SIGSTOP) for 2 s, then continued: every
           ``failed`` event any daemon publishes about any member from then
           until the end of the cluster's run is a false failure (a killed
           member's after its kill excepted; a member that left but is seen
           ``failed`` counts); target 0
  kill -9  a member is killed outright (the daemon and, for Serf, its agent):
           seconds until every other member's API reports it ``failed``; k
           members one after the other, median (and range), next to the
           profile's ``failure_detection_bound(N)``
  leave    SIGTERM to a member (a graceful leave): seconds until every other
           member's API reports it ``left``; k members, median (and range)
Engines take turns at each N, the order alternating between sizes; compare
the two at the same N within a run (the machine is shared and noisy), never
absolute times across runs.  Targets: the embedded engine's join, detection
and leave no slower than Serf's (marked on the embedded row, with the ratio
to Serf); 0 false failures; at most 2 KB/s per idle member (the mean).

An extra row per engine, always at the ``host`` profile: two daemons map the
same POSIX pool (co-located), one is killed with SIGKILL, and the time until
the other's API reports it ``failed`` is measured (the pool watch; target
<= 0.5 s), --colocated-trials times.

Every measurement has a timeout and reports "timeout" rather than hanging;
every process, temporary file and /dev/shm pool of the run is removed at the
end, also on Ctrl-C, SIGTERM or a failure.  Progress goes to stderr.  Exit
status 3 (and a line saying why) when a daemon cannot start at all.

Usage: bench/discovery.py [--sizes 8,16,32,64] [--engines embedded,serf]
                          [--profile local] [--trials 2] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.markup import escape

from bench._sidecars import ApiView, DaemonError, Fleet, SidecarProcess
from discovery.client import SidecarUnavailable
from discovery.profiles import PROFILES, get_profile

ENGINES = ["embedded", "serf"]
SIZES = [8, 16, 32, 64]
QUICK_SIZES = [8, 16]
#: Seconds a daemon may take to serve its API after spawning.
START_TIMEOUT = 30.0
#: Daemons spawned at once while a cluster starts (the box has 2 cores).
START_BATCH = 16
#: Seconds a graceful leave may take to be known everywhere.
LEAVE_TIMEOUT = 15.0
#: How long the stopped member stays stopped.
STOP_SECONDS = 2.0
#: Targets.
IDLE_TARGET = 2048.0  # bytes/s per idle member
COLOCATED_TARGET = 0.5  # seconds
TIMEOUT = "timeout"
Progress = Callable[[str], None]
Value = float | str  # seconds, or TIMEOUT


class NoDaemons(RuntimeError):
    """This machine cannot run a daemon: nothing can be measured here."""


@dataclass(frozen=True)
class Settings:
    """How much of each thing to measure."""

    profile: str
    trials: int
    colocated_trials: int
    idle_seconds: float
    idle_settle: float
    stop_settle: float


# --- one cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    """N daemons of one engine, and a view of each one's API."""

    fleet: Fleet
    engine: str
    size: int
    profile: str
    progress: Progress
    ips: list[str] = field(default_factory=list)
    sidecars: list[SidecarProcess] = field(default_factory=list)
    views: dict[str, ApiView] = field(default_factory=dict)  # node -> view of the live ones
    #: Every view made, those of members gone since too (false failures).
    all_views: list[ApiView] = field(default_factory=list)
    #: node -> monotonic time it was killed (its failed events after it are right).
    killed: dict[str, float] = field(default_factory=dict)

    def node(self, index: int) -> str:
        return f"{self.engine[0]}{self.size:02d}-{index:02d}"

    @property
    def seed(self) -> str:
        return self.sidecars[0].address

    async def spawn(self, index: int) -> SidecarProcess:
        sidecar = await self.fleet.start(
            self.node(index),
            self.ips[index],
            engine=self.engine,
            profile=self.profile,
            join=self.seed if index else None,
        )
        self.sidecars.append(sidecar)
        return sidecar

    async def watch(self, sidecar: SidecarProcess) -> ApiView:
        view = ApiView(sidecar)
        await view.start()
        self.views[sidecar.node] = view
        self.all_views.append(view)
        return view

    async def drop(self, sidecar: SidecarProcess) -> None:
        view = self.views.pop(sidecar.node, None)
        if view is not None:
            await view.close()

    def live(self) -> list[SidecarProcess]:
        return [s for s in self.sidecars if s.node in self.views]

    def live_views(self) -> list[ApiView]:
        return list(self.views.values())

    async def close(self) -> None:
        for view in list(self.views.values()):
            await view.close()
        self.views.clear()
        await self.fleet.stop(self.sidecars)


@dataclass(frozen=True)
class Agreement:
    """When each view first satisfied a predicate, within a timeout."""

    times: list[float]
    #: Nodes of the views that had not by the timeout.
    missing: list[str]

    @property
    def seen(self) -> str:
        return f"{len(self.times)}/{len(self.times) + len(self.missing)}"

    def since(self, start: float) -> Value:
        """Seconds from ``start`` until the last view did (or TIMEOUT)."""
        return TIMEOUT if self.missing or not self.times else max(self.times) - start


async def agreement(
    views: list[ApiView], predicate: Callable[[ApiView], bool], timeout: float
) -> Agreement:
    """Until every view satisfies ``predicate``, or ``timeout`` seconds."""
    futures = [view.when(predicate) for view in views]
    if futures:
        await asyncio.wait(futures, timeout=timeout)
    times, missing = [], []
    for view, future in zip(views, futures, strict=True):
        if future.done() and not future.cancelled():
            times.append(future.result())
        else:
            future.cancel()
            missing.append(view.sidecar.node)
    return Agreement(times, missing)


async def measure_join(cluster: Cluster, trials: int) -> dict[str, Any]:
    """N - trials members up and agreeing; then the others join one at a
    time, each once the cluster agrees again: the seconds from spawning each
    until every member sees all alive."""
    n = cluster.size
    cluster.ips = cluster.fleet.loopback_ips(n)
    began = time.monotonic()
    seed = await cluster.spawn(0)
    await seed.wait_ready(START_TIMEOUT)
    rest = list(range(1, n - trials))
    for start in range(0, len(rest), START_BATCH):
        batch = [await cluster.spawn(i) for i in rest[start : start + START_BATCH]]
        await asyncio.gather(*(s.wait_ready(START_TIMEOUT) for s in batch))
    for sidecar in cluster.sidecars:
        await cluster.watch(sidecar)
    cluster.progress(
        f"{cluster.engine} N={n}: {n - trials} up in {time.monotonic() - began:.1f} s; "
        "waiting for them to agree"
    )
    # A broadcast that misses a member reaches it at the next push/pull.
    timeout = 2 * get_profile(cluster.profile).push_pull_period(n) + 10.0
    first = [cluster.node(i) for i in range(n - trials)]
    agreed = await agreement(cluster.live_views(), ApiView.sees_alive(first), timeout)
    row: dict[str, Any] = {"start_s": time.monotonic() - began}
    if agreed.missing:
        row["start_missing"] = agreed.missing
    joins: list[Value] = []
    ready: list[float] = []
    missing: list[str] = []
    for index in range(n - trials, n):
        names = {cluster.node(i) for i in range(index + 1)}
        spawned = time.monotonic()
        joiner = await cluster.spawn(index)
        ready.append(await joiner.wait_ready(START_TIMEOUT) - spawned)
        await cluster.watch(joiner)
        agreed = await agreement(cluster.live_views(), ApiView.sees_alive(names), timeout)
        joins.append(agreed.since(spawned))
        if agreed.missing:
            missing += agreed.missing
        cluster.progress(
            f"{cluster.engine} N={n}: {joiner.node} joined, known everywhere in "
            f"{_fmt(joins[-1])} s ({agreed.seen})"
        )
    row["join_trials_s"] = joins
    if missing:
        row["join_missing"] = missing
    row["join_s"] = _median(joins)
    row["join_ready_s"] = statistics.median(ready)
    return row


async def measure_idle(cluster: Cluster, settings: Settings) -> dict[str, Any]:
    """Bytes sent and CPU per member per second in steady state."""
    await asyncio.sleep(settings.idle_settle)
    sidecars = cluster.live()

    async def sample(s: SidecarProcess) -> tuple[float, float, float]:
        if s.statsd is not None:
            sent = s.statsd.sent
        else:
            stats = (await s.client.status())["engine_stats"]
            sent = float(stats.get("udp_out_bytes", 0) + stats.get("tcp_out_bytes", 0))
        return time.monotonic(), sent, s.cpu_seconds()

    before = await asyncio.gather(*(sample(s) for s in sidecars))
    await asyncio.sleep(settings.idle_seconds)
    after = await asyncio.gather(*(sample(s) for s in sidecars))
    rates = [(a[1] - b[1]) / (a[0] - b[0]) for a, b in zip(after, before, strict=True)]
    cpu = [(a[2] - b[2]) / (a[0] - b[0]) for a, b in zip(after, before, strict=True)]
    return {
        "idle_bytes_per_s": statistics.mean(rates),
        "idle_bytes_per_s_max": max(rates),
        "idle_cpu": statistics.mean(cpu),
        "idle_seconds": settings.idle_seconds,
    }


async def measure_stop(cluster: Cluster, settings: Settings) -> float:
    """SIGSTOP one member for STOP_SECONDS, SIGCONT, let it settle; returns
    when it was stopped (false failures are counted from then on)."""
    stopped = cluster.sidecars[1]
    started = time.monotonic()
    stopped.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(STOP_SECONDS)
    finally:
        stopped.signal(signal.SIGCONT)
    await asyncio.sleep(settings.stop_settle)
    # Until every view has it alive again (a refuted suspicion, or a
    # false failure and its rejoin), within a bound.
    await agreement(cluster.live_views(), ApiView.sees(stopped.node, "alive"), 15.0)
    return started


def false_failures(cluster: Cluster, since: float) -> list[str]:
    """``failed`` events (as "observer:node") after ``since``, except a
    killed member's after its kill."""
    out = []
    for view in cluster.all_views:
        for t, kind, node in view.events:
            if kind != "failed" or t < since:
                continue
            if node in cluster.killed and t >= cluster.killed[node]:
                continue
            out.append(f"{view.sidecar.node}:{node}")
    return out


async def measure_kill(cluster: Cluster, victim: SidecarProcess) -> Agreement:
    """SIGKILL ``victim``: when every other live member's API had it ``failed``."""
    await cluster.drop(victim)
    bound = get_profile(cluster.profile).failure_detection_bound(cluster.size)
    cluster.killed[victim.node] = time.monotonic()
    victim.signal(signal.SIGKILL)
    return await agreement(
        cluster.live_views(), ApiView.sees(victim.node, "failed"), 2 * bound + 10.0
    )


async def measure_leave(cluster: Cluster, leaver: SidecarProcess) -> tuple[Agreement, int]:
    """SIGTERM ``leaver``: when every other live member's API had it gone
    (``left``, or ``failed``, which is a false failure), and how many had
    it ``failed``."""
    await cluster.drop(leaver)
    leaver.terminate()
    others = cluster.live_views()
    agreed = await agreement(others, ApiView.sees(leaver.node, "left", "failed"), LEAVE_TIMEOUT)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10.0):
            while leaver.proc.poll() is None:
                await asyncio.sleep(0.05)
    return agreed, sum(v.status.get(leaver.node) == "failed" for v in others)


def _median(values: list[Value]) -> Value:
    """Median of seconds with timeouts counted as infinitely long."""
    numbers = sorted(math.inf if v == TIMEOUT else float(v) for v in values)
    middle = statistics.median(numbers) if numbers else math.inf
    return TIMEOUT if math.isinf(middle) else middle


async def measure_cluster(
    fleet: Fleet, engine: str, n: int, settings: Settings, progress: Progress
) -> dict[str, Any]:
    cluster = Cluster(fleet, engine, n, settings.profile, progress)
    row: dict[str, Any] = {
        "detection_bound_s": get_profile(settings.profile).failure_detection_bound(n)
    }
    trials = max(1, min(settings.trials, (n - 2) // 2))
    try:
        progress(f"{engine} N={n}: starting {n} daemons")
        row |= await measure_join(cluster, trials)
        progress(f"{engine} N={n}: idle")
        row |= await measure_idle(cluster, settings)
        progress(
            f"{engine} N={n}: idle {row['idle_bytes_per_s']:.0f} B/s per member; "
            f"SIGSTOP for {STOP_SECONDS:g} s"
        )
        stopped_at = await measure_stop(cluster, settings)
        # Victims and leavers: never the seed, nor the member that was stopped.
        candidates = cluster.sidecars[2:][::-1]
        victims, leavers = candidates[:trials], candidates[trials : 2 * trials]
        detections: list[Value] = []
        for victim in victims:
            progress(f"{engine} N={n}: kill -9 {victim.node}")
            agreed = await measure_kill(cluster, victim)
            detections.append(agreed.since(cluster.killed[victim.node]))
            if agreed.missing:
                row.setdefault("detect_missing", []).extend(agreed.missing)
            progress(
                f"{engine} N={n}: {victim.node} failed everywhere in "
                f"{_fmt(detections[-1])} s ({agreed.seen})"
            )
        row["detect_trials_s"] = detections
        row["detect_s"] = _median(detections)
        leaves: list[Value] = []
        row["leave_seen_failed"] = 0
        row["leave_exit_codes"] = []
        for leaver in leavers:
            progress(f"{engine} N={n}: SIGTERM {leaver.node}")
            started = time.monotonic()
            agreed, failed = await measure_leave(cluster, leaver)
            leaves.append(agreed.since(started))
            row["leave_seen_failed"] += failed
            row["leave_exit_codes"].append(leaver.proc.returncode)
            if agreed.missing:
                row.setdefault("leave_missing", []).extend(agreed.missing)
            progress(
                f"{engine} N={n}: {leaver.node} gone everywhere in {_fmt(leaves[-1])} s "
                f"({agreed.seen}; seen failed at {failed})"
            )
        row["leave_trials_s"] = leaves
        row["leave_s"] = _median(leaves)
        failures = false_failures(cluster, stopped_at)
        row["false_failures"] = len(failures)
        row["false_failure_events"] = failures[:20]
    except (DaemonError, SidecarUnavailable) as exc:
        row["error"] = str(exc)
        progress(f"{engine} N={n}: [bold red]error:[/] {escape(str(exc))}")
        if isinstance(exc, DaemonError) and exc.log:
            progress(f"its log ends:\n{escape(exc.log)}")
    finally:
        await cluster.close()
    return row


# --- the co-located pair ----------------------------------------------------------------


async def measure_colocated(fleet: Fleet, engine: str, trials: int) -> dict[str, Any]:
    """Two daemons mapping one POSIX pool (host profile): SIGKILL one, the
    seconds until the other's API has it ``failed``."""
    values: list[Value] = []
    for trial in range(trials):
        pool = fleet.posix_pool(lease=1.0)
        ips = fleet.loopback_ips(2)
        x = await fleet.start(
            f"c{engine[0]}{trial}x", ips[0], engine=engine, profile="host", pools=[pool]
        )
        view = None
        try:
            await x.wait_ready(START_TIMEOUT)
            y = await fleet.start(
                f"c{engine[0]}{trial}y",
                ips[1],
                engine=engine,
                profile="host",
                join=x.address,
                pools=[pool],
            )
            await y.wait_ready(START_TIMEOUT)
            view = ApiView(y)
            await view.start()
            # y must see x alive and follow its slot before the kill.
            deadline = time.monotonic() + 20.0
            while x.node not in (await y.client.status()).get("watching", {}):
                if time.monotonic() > deadline:
                    raise y.error(f"never watched {x.node}'s slot")
                await asyncio.sleep(0.05)
            killed = time.monotonic()
            x.signal(signal.SIGKILL)
            agreed = await agreement([view], ApiView.sees(x.node, "failed"), 10.0)
            values.append(agreed.since(killed))
        finally:
            if view is not None:
                await view.close()
            await fleet.stop(s for s in fleet.sidecars if s.node.startswith(f"c{engine[0]}{trial}"))
            fleet.unlink_pool(pool)
    numbers = [v for v in values if v != TIMEOUT]
    return {
        "trials_s": values,
        "median_s": _median(values),
        "max_s": TIMEOUT if len(numbers) < len(values) else max(map(float, numbers)),
    }


# --- running it all ------------------------------------------------------------------------


async def preflight(fleet: Fleet, engines: list[str], profile: str) -> None:
    """One lone daemon of each engine: ``NoDaemons`` if this machine cannot
    run one (no executable, no Serf, no free address, a refusal to start);
    a daemon that crashes (a traceback) is an error of the daemon's."""
    try:
        ips = fleet.loopback_ips(len(engines))
    except DaemonError as exc:
        raise NoDaemons(str(exc)) from None
    for engine, ip in zip(engines, ips, strict=True):
        try:
            sidecar = await fleet.start(f"preflight-{engine}", ip, engine=engine, profile=profile)
            try:
                await sidecar.wait_ready(START_TIMEOUT)
            finally:
                await fleet.stop([sidecar])
        except OSError as exc:
            raise NoDaemons(f"cannot run a daemon ({engine} engine): {exc}") from None
        except DaemonError as exc:
            if "Traceback" in exc.log:
                raise
            raise NoDaemons(f"cannot start a daemon ({engine} engine): {exc}") from None


async def measure(
    fleet: Fleet, engines: list[str], sizes: list[int], settings: Settings, progress: Progress
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    await preflight(fleet, engines, settings.profile)
    results: dict[str, dict[str, Any]] = {engine: {} for engine in engines}
    for i, n in enumerate(sizes):
        for engine in engines if i % 2 == 0 else engines[::-1]:
            results[engine][str(n)] = await measure_cluster(fleet, engine, n, settings, progress)
    colocated: dict[str, Any] = {}
    for engine in engines:
        progress(f"{engine}: co-located pair (host profile, one pool), kill -9")
        try:
            colocated[engine] = await measure_colocated(fleet, engine, settings.colocated_trials)
        except (DaemonError, SidecarUnavailable) as exc:
            colocated[engine] = {"error": str(exc)}
            progress(f"{engine}: co-located pair: [bold red]error:[/] {escape(str(exc))}")
            if isinstance(exc, DaemonError) and exc.log:
                progress(f"its log ends:\n{escape(exc.log)}")
    return results, colocated


# --- the report ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def targets(
    results: dict[str, dict[str, Any]], colocated: dict[str, Any]
) -> dict[str, dict[str, bool | None]]:
    """Per cell, whether its target is met (None: nothing to compare)."""
    out: dict[str, dict[str, bool | None]] = {}
    for engine, rows in results.items():
        for n, row in rows.items():
            cell: dict[str, bool | None] = {}
            if engine == "embedded":
                serf = results.get("serf", {}).get(n, {})
                for key in ("join_s", "detect_s", "leave_s"):
                    mine, theirs = row.get(key), serf.get(key)
                    if mine == TIMEOUT:
                        cell[key] = False
                    elif _num(mine) is None or (_num(theirs) is None and theirs != TIMEOUT):
                        cell[key] = None
                    else:
                        cell[key] = theirs == TIMEOUT or float(mine) <= float(theirs)
                if row.get("leave_seen_failed"):
                    cell["leave_s"] = False  # a leave seen as a failure did not converge
            if "false_failures" in row:
                cell["false_failures"] = row["false_failures"] == 0
            if "idle_bytes_per_s" in row:
                cell["idle_bytes_per_s"] = row["idle_bytes_per_s"] <= IDLE_TARGET
            out[f"{engine}/{n}"] = cell
    for engine, row in colocated.items():
        value = _num(row.get("max_s"))
        out[f"colocated/{engine}"] = {"max_s": value is not None and value <= COLOCATED_TARGET}
    return out


def _mark(ok: bool | None) -> str:
    return "" if ok is None else " [green]✓[/]" if ok else " [red]✗[/]"


def _ratio(row: dict[str, Any], peer: dict[str, Any] | None, key: str) -> str:
    if peer is None:
        return ""
    mine, theirs = _num(row.get(key)), _num(peer.get(key))
    if mine is None or theirs is None or theirs == 0:
        return ""
    return f" {mine / theirs:.2f}x"


def _trials(values: list[Value]) -> str:
    numbers = [float(v) for v in values if v != TIMEOUT]
    if len(values) < 2 or not numbers:
        return ""
    return f" ({min(numbers):.2f}-{max(numbers):.2f})"


def _timed(
    row: dict[str, Any], mark: dict[str, bool | None], peer: dict[str, Any] | None, what: str
) -> str:
    """A timed cell: the median, the range of the trials, the mark and the
    ratio to the peer."""
    key = f"{what}_s"
    return (
        _fmt(row.get(key))
        + _trials(row.get(f"{what}_trials_s", []))
        + _mark(mark.get(key))
        + _ratio(row, peer, key)
    )


def report(
    results: dict[str, dict[str, Any]],
    colocated: dict[str, Any],
    marks: dict[str, dict[str, bool | None]],
    profile: str,
    wall: float,
) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(width=max(Console().width, 175))
    serf_profile = "local" if profile == "host" else profile
    table = Table(
        title=f"membership on loopback, profile {profile!r} (Serf's {serf_profile!r}): seconds, "
        "median (range) of the trials; on embedded rows ✓/✗ against Serf and the ratio to it"
    )
    for column in (
        "N",
        "engine",
        "join → known everywhere",
        "ready",
        "kill -9 → failed everywhere",
        "bound",
        "leave → left everywhere",
        "false failures",
        "idle B/s per member (busiest)",
        "idle CPU",
    ):
        table.add_column(column, justify="right")
    sizes = sorted({int(n) for rows in results.values() for n in rows})
    for n in sizes:
        for engine, rows in results.items():
            row = rows.get(str(n))
            if row is None:
                continue
            mark = marks.get(f"{engine}/{n}", {})
            peer = results.get("serf", {}).get(str(n)) if engine == "embedded" else None

            if "error" in row and "join_s" not in row:
                table.add_row(str(n), engine, f"[red]error[/]: {escape(row['error'])}")
                continue
            failed = row.get("leave_seen_failed")
            table.add_row(
                str(n),
                engine,
                _timed(row, mark, peer, "join"),
                _fmt(row.get("join_ready_s")),
                _timed(row, mark, peer, "detect"),
                _fmt(row.get("detection_bound_s"), 1),
                _timed(row, mark, peer, "leave")
                + (f" [red]{failed} saw failed[/]" if failed else ""),
                _fmt(row.get("false_failures"), 0) + _mark(mark.get("false_failures")),
                f"{_fmt(row.get('idle_bytes_per_s'), 0)} "
                f"({_fmt(row.get('idle_bytes_per_s_max'), 0)})"
                + _mark(mark.get("idle_bytes_per_s")),
                f"{row['idle_cpu']:.1%}" if "idle_cpu" in row else "-",
            )
    out.print(table)
    if colocated:
        table = Table(
            title="co-located pair (profile 'host', one POSIX pool): kill -9 → failed at the peer"
        )
        for column in (
            "engine",
            "trials (s)",
            "median (s)",
            f"max (s), target ≤ {COLOCATED_TARGET}",
        ):
            table.add_column(column, justify="right")
        for engine, row in colocated.items():
            if "error" in row:
                table.add_row(engine, f"[red]error[/]: {escape(row['error'])}", "", "")
                continue
            table.add_row(
                engine,
                ", ".join(_fmt(v, 3) for v in row["trials_s"]),
                _fmt(row["median_s"], 3),
                _fmt(row["max_s"], 3) + _mark(marks[f"colocated/{engine}"]["max_s"]),
            )
        out.print(table)
    for engine, rows in results.items():
        for size, row in rows.items():
            if row.get("false_failure_events"):
                out.print(
                    f"{engine} N={size}: false failures (observer:member): "
                    + ", ".join(row["false_failure_events"]),
                    highlight=False,
                )
            for key in ("start_missing", "join_missing", "detect_missing", "leave_missing"):
                if row.get(key):
                    out.print(
                        f"{engine} N={size}: {key.split('_')[0]} not seen in time by "
                        + ", ".join(row[key]),
                        highlight=False,
                    )
            if "error" in row and "join_s" in row:
                out.print(f"{engine} N={size}: stopped early: {escape(row['error'])}")
    out.print(
        "join: from spawning a joiner until every API shows all alive (ready: until the joiner "
        "serves its API).  kill -9 / leave: until every other member's API reports it failed / "
        "left.  bound: the profile's failure_detection_bound(N).  idle bytes: payload sent over "
        "UDP + TCP per member, the mean; embedded from engine_stats (udp_out_bytes + "
        "tcp_out_bytes) in the daemon's status, Serf from its memberlist's memberlist.udp.sent "
        "+ memberlist.tcp.sent counters over statsd.  A Serf member is its daemon and its "
        "agent: both are stopped and killed, both count in idle CPU.  "
        f"Wall time {wall:.0f} s.",
        highlight=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", help="cluster sizes, e.g. 8,16 (default 8,16,32,64)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--profile", default="local", choices=sorted(PROFILES))
    parser.add_argument(
        "--quick", action="store_true", help="N=8,16, one kill and one leave, shorter idle"
    )
    parser.add_argument(
        "--trials", type=int, help="joins, kills and leaves measured per cluster (default 2)"
    )
    parser.add_argument("--colocated-trials", type=int, help="(default 3)")
    parser.add_argument("--idle-seconds", type=float, help="(default 5)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the daemons' logs (the path is printed)"
    )
    parser.add_argument(
        "--log-level", default="info", help="the daemons' (debug: with Serf's agent output)"
    )
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines: a list of {', '.join(ENGINES)}")
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    else:
        sizes = QUICK_SIZES if args.quick else SIZES
    if any(n < 4 for n in sizes):
        parser.error("--sizes: at least 4 members (a seed, one stopped, one killed, one leaving)")
    settings = Settings(
        profile=args.profile,
        trials=args.trials or (1 if args.quick else 2),
        colocated_trials=args.colocated_trials or (2 if args.quick else 3),
        idle_seconds=args.idle_seconds or (3.0 if args.quick else 5.0),
        idle_settle=1.0 if args.quick else 2.0,
        stop_settle=3.0,
    )

    from rich.console import Console

    console = Console(stderr=True)
    began = time.monotonic()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - began:6.1f} s[/] {message}", highlight=False)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    fleet = Fleet(args.log_level)
    try:
        results, colocated = asyncio.run(measure(fleet, engines, sizes, settings, progress))
    except NoDaemons as exc:
        console.print(f"no daemon can start here: {escape(str(exc))}")
        return 3
    except DaemonError as exc:
        console.print(f"[bold red]a daemon failed:[/] {escape(str(exc))}\n{escape(exc.log)}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted: every daemon stopped, every temporary file removed")
        return 130
    finally:
        fleet.close(keep_logs=args.keep_logs)
        if args.keep_logs:
            console.print(f"the daemons' logs are in {fleet.directory}")
    wall = time.monotonic() - began
    marks = targets(results, colocated)
    report(results, colocated, marks, settings.profile, wall)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "discovery",
                    "profile": settings.profile,
                    "sizes": sizes,
                    "engines": engines,
                    "settings": settings.__dict__,
                    "results": results,
                    "colocated": colocated,
                    "targets": marks,
                    "bytes_measured_by": {
                        "embedded": "status engine_stats udp_out_bytes + tcp_out_bytes",
                        "serf": "memberlist.udp.sent + memberlist.tcp.sent over statsd",
                    },
                    "wall_s": wall,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
