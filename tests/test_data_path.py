"""The transport's data path (``aiocoloc/transport/data_path.py``): compiled by
default, and its pure-Python source the reference that passes the same tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("env", "compiled"), [("1", False), ("", True), ("0", True)])
def test_environment_selects_the_data_path(env: str, compiled: bool) -> None:
    code = (
        "import asyncio, aiocoloc.transport as t\n"
        "tr = t.SwitchableTransport(asyncio.new_event_loop(), asyncio.Protocol())\n"
        "m = __import__('sys').modules[type(tr._core).__module__]\n"
        "print(m.COMPILED, m.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "AIOCOLOC_NO_EXTENSIONS": env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.split()
    assert out[0] == str(compiled)
    assert out[1].endswith(".py") != compiled


def test_write_is_the_data_paths_own() -> None:
    """``transport.write`` is the data path's method itself: no Python call in
    between (what the compiled path saves on every write)."""
    import asyncio

    from aiocoloc.transport import SwitchableTransport

    loop = asyncio.new_event_loop()
    try:
        transport = SwitchableTransport(loop, asyncio.Protocol())
        assert transport.write == transport._core.write
        assert repr(transport) == "<SwitchableTransport open tx=tcp rx=tcp>"
        transport.abort()
        assert transport.is_closing()
    finally:
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_the_reference_passes_the_transport_tests() -> None:
    """The pure-Python data path runs the transport's own suite and the write
    and life-cycle conformance tests, on both loops, every mode."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_transport.py",
            "tests/conformance/test_writes.py",
            "tests/conformance/test_lifecycle.py",
        ],
        env={**os.environ, "AIOCOLOC_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=110,
    )
    tail = "\n".join(result.stdout.splitlines()[-15:])
    assert result.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail
