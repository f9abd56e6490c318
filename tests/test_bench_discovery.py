"""``bench/discovery.py`` in its smallest run: four embedded daemons at the
``local`` profile and the co-located pair, as a subprocess; its JSON line
holds every measurement, within what the profile promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from discovery.profiles import get_profile

BENCH = Path(__file__).resolve().parent.parent / "bench" / "discovery.py"
#: The bench's exit status when no daemon can start on this machine.
NO_DAEMONS = 3


def test_smallest_run() -> None:
    argv = [sys.executable, str(BENCH), "--quick", "--sizes", "4", "--engines", "embedded"]
    run = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=100)
    if run.returncode == NO_DAEMONS:
        pytest.skip(f"daemons cannot start here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out["benchmark"], out["profile"], out["sizes"]) == ("discovery", "local", [4])

    row = out["results"]["embedded"]["4"]
    assert "error" not in row, row["error"]
    local = get_profile("local")
    bound = local.failure_detection_bound(4)
    assert row["detection_bound_s"] == bound
    assert "timeout" not in (row["join_s"], row["detect_s"], row["leave_s"]), row
    # Usually well under a second; a broadcast that misses a member waits
    # for the next push/pull.
    assert 0 < row["join_ready_s"] <= row["join_s"] < 2 * local.push_pull_period(4), row
    assert 0 < row["detect_s"] < bound, (row, run.stderr[-2000:])
    assert "detect_missing" not in row
    assert 0 <= row["leave_s"] < local.push_pull_period(4), row
    assert "leave_missing" not in row and row["leave_seen_failed"] == 0
    assert row["leave_exit_codes"] == [0]
    # A 2 s stop is shorter than the profile's shortest suspicion (3 s).
    assert row["false_failures"] == 0, row["false_failure_events"]
    assert 0 < row["idle_bytes_per_s"] <= row["idle_bytes_per_s_max"] < 2048, row
    assert 0 <= row["idle_cpu"] < 1

    pair = out["colocated"]["embedded"]
    assert "error" not in pair, pair["error"]
    assert len(pair["trials_s"]) == 2
    assert 0 < pair["max_s"] <= 0.5, pair
    assert out["targets"]["colocated/embedded"] == {"max_s": True}
    assert out["targets"]["embedded/4"]["false_failures"] is True
    # No other engine in this run: nothing to compare with.
    assert out["targets"]["embedded/4"]["detect_s"] is None
