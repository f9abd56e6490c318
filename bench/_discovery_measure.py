"""The measurements of ``bench/discovery.py``: on each cluster, join, idle,
stop, kill -9 and leave (see its docstring for what each one times); the
co-located pair; and the run of them all, engines taking turns."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import statistics
import time
from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from bench._discovery_cluster import TIMEOUT, Agreement, Cluster, Progress, Value, agreement
from bench._discovery_report import fmt
from bench._sidecars import DaemonError, SidecarProcess
from bench._sidecars_fleet import Fleet
from bench._sidecars_view import ApiView
from discovery.client import SidecarUnavailable
from discovery.profiles import get_profile

__all__ = ["NoDaemons", "Settings", "measure"]

#: Seconds a daemon may take to serve its API after spawning.
START_TIMEOUT = 30.0
#: Daemons spawned at once while a cluster starts (the box has 2 cores).
START_BATCH = 16
#: Seconds a graceful leave may take to be known everywhere.
LEAVE_TIMEOUT = 15.0
#: How long the stopped member stays stopped.
STOP_SECONDS = 2.0


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
            f"{fmt(joins[-1])} s ({agreed.seen})"
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
                f"{fmt(detections[-1])} s ({agreed.seen})"
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
                f"{engine} N={n}: {leaver.node} gone everywhere in {fmt(leaves[-1])} s "
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
    """Every engine at every size (their order alternating from one size to
    the next), then each engine's co-located pair: (engine -> size -> row,
    engine -> co-located row)."""
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
