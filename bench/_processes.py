"""The event loops the benchmarks run on, and the server processes they
start: ``python SCRIPT --serve ...`` prints one line (its port, or its
socket's path) and serves until its stdin closes."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import uvloop

__all__ = ["LOOPS", "spawn", "stop"]

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def spawn(script: str | Path, args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start ``script`` with ``args``; returns it and the first line it printed."""
    child = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def stop(child: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """Close the server's stdin and reap it (killed after ``timeout`` seconds)."""
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
