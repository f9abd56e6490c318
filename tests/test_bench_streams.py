"""bench/streams.py, run quickly as a user would (one loop, short cells):
every cell of the targets table is measured and marked, CPU per GB and
memory per idle connection are there, and the JSON line says which cells
break their targets.  Speed itself is not asserted (a shared, noisy machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.targets import TARGETS, target_for

BENCH = Path(__file__).resolve().parents[1] / "bench" / "streams.py"


@pytest.mark.timeout(300)
def test_quick_run_reports_every_cell_against_its_target() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "0.05", "--loops", "asyncio", "--json"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "streams"
    for kind in ("tcp", "uds", "shm", "shm-as-run"):
        row = out["results"][f"{kind}/asyncio"]
        for size in (65536, 1 << 20):
            assert row[f"stream_{size}"] > 0 and row[f"cpu_per_gb_{size}"] > 0, (kind, row)
    conn = out["connections"]["asyncio"]
    assert conn["idle_connections"] == 50
    assert conn["idle_shm_bytes_per_conn"] > 0 and conn["idle_conns_per_64mib_pool"] > 0
    marks = out["targets"]
    # Every ratio with a target is marked; the cells of the table are all there.
    assert set(marks) == {cell for cell in out["ratios"] if target_for(cell)}
    for name in (
        "stream_64",
        "stream_1048576",
        "rr_64_p50",
        "lowrate_p50",
        "setup_p50",
        "short_conn_per_s",
        "cpu_per_gb_1048576",
        "idle_conns_per_64mib_pool",
    ):
        assert f"asyncio/{name}" in marks, name
    for cell, m in marks.items():
        op, bound, _ = target_for(cell)  # type: ignore[misc]
        assert m["met"] == (m["ratio"] >= bound if op == ">=" else m["ratio"] <= bound), cell
    assert out["broken"] == sorted(c for c, m in marks.items() if not m["met"])
    assert len(TARGETS) >= 9
