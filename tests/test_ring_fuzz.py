"""Fuzzed shared headers and pipe layouts never crash a ring or pipe end (run in a
child process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FUZZ_SCALE, _ring_c

WORKER = Path(__file__).with_name("ring_fuzz_worker.py")


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(
            "aiocoloc._ring",
            id="cython",
            marks=pytest.mark.skipif(_ring_c is None, reason="Cython ring not built"),
        ),
        pytest.param("aiocoloc._ring_py", id="python"),
    ],
)
@pytest.mark.timeout(300 * FUZZ_SCALE)
def test_fuzzed_headers_never_crash(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), module, str(400 * FUZZ_SCALE)],
        capture_output=True,
        text=True,
        timeout=280 * FUZZ_SCALE,
    )
    assert proc.returncode == 0, (
        f"fuzz worker died with {proc.returncode} (negative: killed by signal)\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "fuzz ok" in proc.stdout


def test_guard_page_catches_an_overrun() -> None:
    """The harness itself works: touching the guard page kills the child."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ctypes;"
        "from ring_fuzz_worker import GuardedRing; from aiocoloc import _ring_py as r;"
        "g = GuardedRing(r, 64); addr = ctypes.addressof(ctypes.c_char.from_buffer(g.view));"
        "ctypes.string_at(addr + len(g.view), 1)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(WORKER.parent)], capture_output=True, timeout=60
    )
    assert proc.returncode < 0  # SIGSEGV
