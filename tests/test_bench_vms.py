"""``bench/vms.py --quick --json`` as a subprocess: two QEMU guests sharing
the host pool.  Its JSON line holds every cell for both paths, and the shm
path really ran on shared memory, on the host pool.  No speed ratio is
asserted (the machine is shared and noisy).  Skipped, with the reason,
where QEMU guests cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "vms.py"
CELLS = [
    "stream_mb_s",
    "setup_p50_ms",
    "setup_first_ms",
    "rr_64.p50_us",
    "rr_64.p99_us",
    "rr_65536.p50_us",
    "rr_65536.p99_us",
]


def _cell(row: dict[str, object], key: str) -> object:
    value: object = row
    for part in key.split("."):
        assert isinstance(value, dict), (key, row)
        value = value[part]
    return value


def test_quick_run() -> None:
    try:
        harness.prepare()
    except harness.QemuUnavailable as exc:
        pytest.skip(f"QEMU guests cannot run here: {exc}")
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr[-4000:] + run.stdout[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "vms"
    assert out["environment"]["accel"] == "tcg" and out["environment"]["guest_cpus"] == 1

    pool_id = out["pool"]["id"]
    assert out["pool"]["name"].startswith("aiocoloc-bench-")
    assert not Path("/dev/shm", out["pool"]["name"]).exists()  # removed at the end
    results, ratios = out["results"], out["ratios"]
    for key in CELLS:
        for path in ("tcp", "shm"):
            value = _cell(results[path], key)
            assert isinstance(value, float) and value > 0, (path, key, value)
        assert ratios[key] > 0, (key, ratios)
    for path in ("tcp", "shm"):
        for size in (64, 65536):
            cell = results[path][f"rr_{size}"]
            assert cell["rounds"] == out["settings"]["rounds"]
            assert cell["p50_us"] <= cell["p99_us"], (path, size, cell)
        assert len(results[path]["setup_ms"]) == out["settings"]["setups"]

    # The steady-state connection stayed on shm both ways, on the host pool
    # seen through each guest's ivshmem device; so did every one the server saw.
    state = results["shm"]["state"]
    assert (state["mode"], state["rx_mode"], state["pool"]) == ("shm", "shm", pool_id), state
    assert state["fallback_reason"] is None
    assert state["doorbell"] == "message" and out["doorbells"] == "messages"  # (the default)
    served = out["server"]["connections"]
    assert served and out["server"]["shm_connections"] == len(served), served
    assert all(c["pool"] == pool_id for c in served), served

    for role in ("a", "b"):
        guest = out["guests"][role]
        assert 0 < guest["boot_s"] < guest["sidecar_s"] < guest["total_s"], guest
