"""``bench/discovery.py``'s report: every cell against its target (the
embedded engine against Serf, 0 false failures, idle bytes, the co-located
pair's detection) and the tables of it all."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench._discovery_cluster import TIMEOUT, Value

__all__ = ["COLOCATED_TARGET", "IDLE_TARGET", "fmt", "report", "targets"]

IDLE_TARGET = 2048.0  # bytes/s per idle member
COLOCATED_TARGET = 0.5  # seconds


def fmt(value: Any, digits: int = 2) -> str:
    """A cell's text: "-" for nothing, a timeout as it is, a number to ``digits``."""
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
        fmt(row.get(key))
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
    """The table of the clusters, the co-located pair's, and what they leave out."""
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
                fmt(row.get("join_ready_s")),
                _timed(row, mark, peer, "detect"),
                fmt(row.get("detection_bound_s"), 1),
                _timed(row, mark, peer, "leave")
                + (f" [red]{failed} saw failed[/]" if failed else ""),
                fmt(row.get("false_failures"), 0) + _mark(mark.get("false_failures")),
                f"{fmt(row.get('idle_bytes_per_s'), 0)} "
                f"({fmt(row.get('idle_bytes_per_s_max'), 0)})"
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
                ", ".join(fmt(v, 3) for v in row["trials_s"]),
                fmt(row["median_s"], 3),
                fmt(row["max_s"], 3) + _mark(marks[f"colocated/{engine}"]["max_s"]),
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
