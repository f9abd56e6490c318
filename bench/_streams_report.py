"""bench/streams.py's tables: the measurements, then every cell against its
target (``bench.targets``), with the cells that break theirs marked."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.targets import summary

__all__ = ["CPU_SIZES", "RR_SIZES", "STREAM_SIZES", "print_report"]

#: The cells bench/streams.py measures (it takes them from here).
STREAM_SIZES = [64, 1024, 65536, 1 << 20]
RR_SIZES = [64, 1024, 65536]
#: Stream sizes whose CPU per GB is held to a target (small writes cost per write).
CPU_SIZES = [65536, 1 << 20]


def _size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1024 else f"{n}B"


def _peers(out: Console, results: dict[str, Any]) -> None:
    table = Table(title="asyncio streams, server in another process (MB/s; latency in us)")
    columns = (
        ["peer"]
        + [f"stream {_size(s)}" for s in STREAM_SIZES]
        + [f"rr {_size(s)} p50" for s in RR_SIZES]
        + ["1/ms ping p50", "idle CPU"]
        + [f"CPU s/GB {_size(s)}" for s in CPU_SIZES]
    )
    for column in columns:
        table.add_column(column, justify="right")
    for key, row in results.items():
        streams = [f"{row[f'stream_{s}'] / 1e6:,.0f}" for s in STREAM_SIZES]
        cpu = [f"{row[f'cpu_per_gb_{s}']:.2f}" for s in CPU_SIZES]
        if "lowrate" not in row:  # a stream-only kind
            table.add_row(key, *streams, *["-"] * (len(RR_SIZES) + 2), *cpu)
            continue
        table.add_row(
            key,
            *streams,
            *(f"{row[f'rr_{s}']['p50_us']:.0f}" for s in RR_SIZES),
            f"{row['lowrate']['p50_us']:.0f}",
            f"{row['idle_cpu']:.1%}",
            *cpu,
        )
    out.print(table)


def _connections(out: Console, connections: dict[str, Any]) -> None:
    table = Table(
        title="connections, server in another process (set-up: connect -> first 64 B echo, "
        "p50 in us, cold: the pool mapped anew; short: 64 B request, 1K reply, close; "
        "idle: an upgraded connection at rest)"
    )
    for column in (
        "loop",
        "set-up tcp",
        "set-up shm",
        "set-up shm cold",
        "short plain conn/s",
        "short aiocoloc conn/s",
        "idle: pool bytes/conn",
        "idle: conns per 64 MiB pool",
        "idle: client RSS/conn",
    ):
        table.add_column(column, justify="right")
    for lp, conn in connections.items():
        table.add_row(
            lp,
            f"{conn['tcp_setup_p50_us']:.0f}",
            f"{conn['shm_setup_p50_us']:.0f}",
            f"{conn['shm_cold_setup_p50_us']:.0f}",
            f"{conn['short_plain_conn_per_s']:,.0f}",
            f"{conn['short_aiocoloc_conn_per_s']:,.0f}",
            f"{conn['idle_shm_bytes_per_conn']:,.0f}",
            f"{conn['idle_conns_per_64mib_pool']:,.0f}",
            f"{conn['idle_client_rss_bytes_per_conn']:,.0f}",
        )
    out.print(table)


def _targets(out: Console, marks: dict[str, dict[str, Any]]) -> None:
    table = Table(
        title="every cell against its target: streams and latencies vs the best socket peer "
        "(any kind, any loop); CPU per GB and connection cells vs plain TCP on the same loop"
    )
    for column, justify in (
        ("cell", "left"),
        ("ratio", "right"),
        ("target", "right"),
        ("", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for cell, m in marks.items():
        verdict = "[green]met[/]" if m["met"] else "[bold red]BREAKS its target[/]"
        value = m["ratio"]
        shown = f"{value:,.0f}" if "per_64mib" in cell else f"{value:.2f}x"
        table.add_row(cell, shown, m["target"], verdict)
    out.print(table)
    out.print(summary(marks)[1])


def print_report(
    results: dict[str, Any],
    connections: dict[str, Any],
    ratios: dict[str, float],
    marks: dict[str, dict[str, Any]],
) -> None:
    """The tables, on stdout (the JSON line, if asked for, follows them)."""
    out = Console(width=max(Console().width, 150))
    _peers(out, results)
    _connections(out, connections)
    _targets(out, marks)
    untargeted = {k: v for k, v in ratios.items() if k not in marks}
    if untargeted:
        out.print("other ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in untargeted.items()))
