"""The performance targets every benchmark cell is held to, in one place.

A target is a bound on a cell's ratio against its peer in the same run
(shared memory is never slower than a socket, and where it pays, well
ahead), or on a count (``idle_conns_per_64mib_pool``): ``(">=", x)`` for cells where higher is better (throughput,
connections per second), ``("<=", x)`` where lower is (latency, set-up
time, CPU per GB).  ``mark`` says which cells of a run meet theirs.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TARGETS", "mark", "summary", "target_for"]

#: Cell pattern (``{loop}/`` stripped) -> (comparison, bound, what it means).
TARGETS: dict[str, tuple[str, float, str]] = {
    r"stream_(64|1024)(_as_run)?": (">=", 3.0, "small writes: 3x the best socket"),
    r"stream_65536(_as_run)?": (">=", 3.0, "64 KiB writes: 3x the best socket (stretch 5x)"),
    r"stream_1048576(_as_run)?": (">=", 3.0, "1 MiB writes: 3x the best socket"),
    r"rr_\d+_p50": ("<=", 0.25, "ping-pong p50: a quarter of the best socket's"),
    r"lowrate_p50": ("<=", 1.0, "a message a millisecond: no slower than a socket"),
    r"short_conn_per_s": (">=", 1.0, "short connections: as many per second as plain TCP"),
    r"setup_p50": ("<=", 2.0, "set-up: at most twice a TCP connect + echo"),
    r"setup_cold_p50": ("<=", 2.0, "set-up, pool mapped anew: at most twice TCP's"),
    r"cpu_per_gb_\d+": ("<=", 0.5, "CPU per GB moved, both processes: half of TCP's"),
    r"idle_conns_per_64mib_pool": (">=", 1000, "idle upgraded connections a 64 MiB pool holds"),
    r"per_round_\d+": ("<=", 1.0, "N busy connections: time per round no more than TCP's"),
    r"upgraded_\d+": (">=", 1.0, "N connections to one server: every one upgrades"),
    r"http_body_\d+": (">=", 2.0, "large bodies through aiohttp: twice plain's rate"),
}


def target_for(cell: str) -> tuple[str, float, str] | None:
    """The target of ``cell`` (``"asyncio/stream_64"`` or ``"stream_64"``)."""
    name = cell.split("/", 1)[-1]
    for pattern, target in TARGETS.items():
        if re.fullmatch(pattern, name):
            return target
    return None


def mark(ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each cell that has a target: its ratio, the target, and whether it is met."""
    out: dict[str, dict[str, Any]] = {}
    for cell, ratio in ratios.items():
        target = target_for(cell)
        if target is None:
            continue
        op, bound, meaning = target
        met = ratio >= bound if op == ">=" else ratio <= bound
        out[cell] = {"ratio": ratio, "target": f"{op} {bound:g}", "met": met, "means": meaning}
    return out


def summary(marks: dict[str, dict[str, Any]]) -> tuple[list[str], str]:
    """The cells of ``mark``'s result that break their targets (sorted), and
    the line a benchmark prints about them."""
    broken = sorted(cell for cell, m in marks.items() if not m["met"])
    line = f"{len(marks) - len(broken)} of {len(marks)} cells meet their targets (bench/targets.py)"
    return broken, line + (f"; breaking: {', '.join(broken)}" if broken else "")
