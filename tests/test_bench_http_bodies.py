"""bench/http_bodies.py, run quickly as a user would: aiohttp downloads plain and on
aiocoloc (upgraded for real), every body size measured and marked against
its target.  Speed itself is not asserted (a shared, noisy machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.targets import target_for

BENCH = Path(__file__).resolve().parents[1] / "bench" / "http_bodies.py"


@pytest.mark.timeout(200)
def test_quick_run_downloads_every_size_on_both_paths() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--seconds",
            "0.2",
            "--sizes",
            f"{1 << 20},{4 << 20}",
            "--loops",
            "uvloop",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "http"
    assert [row["size"] for row in out["rows"]] == [1 << 20, 4 << 20]
    for row in out["rows"]:
        assert row["plain_bytes_per_s"] > 0 and row["shm_bytes_per_s"] > 0
    marks = out["targets"]
    assert set(marks) == {"uvloop/http_body_1048576", "uvloop/http_body_4194304"}
    for cell, m in marks.items():
        op, bound, _ = target_for(cell)  # type: ignore[misc]
        assert op == ">=" and m["met"] == (m["ratio"] >= bound)
    assert out["broken"] == sorted(c for c, m in marks.items() if not m["met"])
