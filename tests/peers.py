"""The other process of a test: start a peer script, read its lines, end it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path


def spawn(script: Path, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` with this interpreter; its stdin and stdout are pipes."""
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def line(child: subprocess.Popen[str]) -> str:
    """The next line the peer prints (without blocking the loop)."""
    assert child.stdout is not None
    text = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
    assert text, f"peer exited with {child.poll()}"
    return text


def finish(child: subprocess.Popen[str]) -> None:
    """Kill the peer if it still runs, reap it, close its pipes."""
    if child.poll() is None:
        child.kill()
    child.wait()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()
