#!/usr/bin/env python3
"""aiocoloc demo: two real processes move data through a shared-memory ring
(POSIX shm) and, for comparison, through a Unix socket pair.

Run with `make demo`.  Later waves of aiocoloc turn this into a client and a
server whose asyncio connection upgrades itself to shared memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from aiocoloc import ring
from bench.ring import (
    RING_CAPACITY,
    bench_ring_two_processes,
    bench_unix_two_processes,
    human,
)

SIZES = [1024, 64 * 1024, 1024 * 1024]
SECONDS = 1.0


def main() -> int:
    console = Console()
    console.print(
        f"[bold]aiocoloc[/] demo: a producer process streams to a consumer process for "
        f"{SECONDS:.0f} s per cell\nthrough a {human(RING_CAPACITY)} ring in POSIX shared "
        f"memory ({ring.IMPLEMENTATION} ring), and through a Unix socket pair.\n"
    )
    table = Table(title="two processes, one direction, MB/s")
    for column in ("write size", "shared-memory ring", "Unix socket", "ring / socket"):
        table.add_column(column, justify="right")
    with console.status("measuring") as status:
        for size in SIZES:
            status.update(f"shared-memory ring, {human(size)} writes")
            shm = bench_ring_two_processes(size, SECONDS)
            status.update(f"Unix socket, {human(size)} writes")
            uds = bench_unix_two_processes(size, SECONDS)
            table.add_row(
                human(size), f"{shm / 1e6:,.0f}", f"{uds / 1e6:,.0f}", f"{shm / uds:.1f}x"
            )
    console.print(table)
    console.print("Full comparison, with memcpy as the physical limit: [bold]make bench[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
