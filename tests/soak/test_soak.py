"""Soak: many connections to a server process, for minutes, on both loops.

Run by ``make soak`` (``AIOCOLOC_SOAK_SECONDS``, default 300 there); skipped
in ``make test``.  Workers keep connections coming and going with the
default policy (each upgrades mid-stream once it has moved 64 KiB), echo
random-sized messages through them, switch paths at random, and check every
byte.  At the end nothing may be left: no live transports, channels or pool
references, no descriptors, no /dev/shm entries (the autouse fixtures).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import threading
import time
from typing import Any

import pytest

import aiocoloc
from aiocoloc import debug
from aiocoloc.connect.colocation import local_pools

from ..conftest import open_fds
from ..peers import finish, line, spawn
from ..test_connect_processes import PEER
from ..test_transport import LOOPS, run

SECONDS = float(os.environ.get("AIOCOLOC_SOAK_SECONDS", "0"))
WORKERS = int(os.environ.get("AIOCOLOC_SOAK_WORKERS", "16"))
#: Seconds an echo may take before the soak calls it a hang.
STALL = 20.0
SIZES = (1, 100, 4096, 65_536, 300_000, 1 << 20)

pytestmark = pytest.mark.skipif(
    SECONDS <= 0, reason="soak runs with `make soak` (AIOCOLOC_SOAK_SECONDS)"
)
_log = logging.getLogger("aiocoloc.soak")


def _state(transport: Any) -> dict[str, Any]:
    """A transport's inner state, for a report of what it waits for."""
    tcp = transport._tcp
    return {
        "overflow": len(transport._overflow),
        "eof_written": transport._eof_written,
        "eof_pending": transport._eof_pending,
        "tcp_closed": transport._tcp_closed,
        "tcp_closing": tcp.is_closing() if tcp is not None else None,
        "tcp_buffer": tcp.get_write_buffer_size() if tcp is not None else None,
        "link_closed": transport._link.closed if transport._link is not None else None,
        "rx_eof": transport._rx_eof,
        "paused_reading": transport._paused_reading,
    }


@pytest.mark.timeout(max(120, int(SECONDS * 2.5)))
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connections_come_and_go_for_minutes_without_loss_or_leak(loop_kind: str) -> None:
    child = spawn(PEER, "server", loop_kind)
    fds_before = open_fds()
    counts_before = debug.live.snapshot()
    totals = {"connections": 0, "upgraded": 0, "bytes": 0, "switches": 0}

    def drain_child() -> None:  # the peer prints a line per upgraded connection
        assert child.stdout is not None
        for _ in child.stdout:
            pass

    async def worker(port: int, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            async with asyncio.timeout(STALL):
                reader, writer = await aiocoloc.open_connection("127.0.0.1", port)
            totals["connections"] += 1
            try:
                for _ in range(rng.randrange(1, 40)):
                    payload = rng.randbytes(rng.choice(SIZES))
                    writer.write(payload)
                    try:
                        async with asyncio.timeout(STALL):
                            await writer.drain()
                            echoed = await reader.readexactly(len(payload))
                    except TimeoutError:
                        transport = writer.transport
                        raise AssertionError(
                            f"no echo of {len(payload)} bytes in {STALL} s on {transport!r}: "
                            f"{transport.get_extra_info('aiocoloc')}, "
                            f"buffered {transport.get_write_buffer_size()}, "
                            f"read {len(reader._buffer)}"  # type: ignore[attr-defined]
                        ) from None
                    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
                    totals["bytes"] += len(payload)
                    transport = writer.transport
                    info = transport.get_extra_info("aiocoloc")
                    if info["pool"] is not None and rng.random() < 0.1:
                        target = "tcp" if info["mode"] == "shm" else "shm"
                        if transport.switch_tx(target) is not None:  # type: ignore[attr-defined]
                            totals["switches"] += 1
                if writer.transport.get_extra_info("aiocoloc")["pool"] is not None:
                    totals["upgraded"] += 1
            finally:
                writer.close()
                try:
                    async with asyncio.timeout(STALL):
                        await writer.wait_closed()
                except TimeoutError:
                    raise AssertionError(
                        f"close not done in {STALL} s: {writer.transport!r} "
                        f"{writer.transport.get_extra_info('aiocoloc')} {_state(writer.transport)}"
                    ) from None

    async def scenario() -> None:
        port = int(await line(child))
        threading.Thread(target=drain_child, daemon=True).start()
        start = time.monotonic()
        deadline = start + SECONDS
        tasks = [asyncio.create_task(worker(port, i, deadline)) for i in range(WORKERS)]
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=10)
            _log.warning(
                "soak %s: %.0f s, %s, live %s",
                loop_kind,
                time.monotonic() - start,
                totals,
                debug.live.nonzero(),
            )
        for task in tasks:
            task.result()  # a failed worker fails the soak

    try:
        run(loop_kind, scenario, timeout=SECONDS * 2 + 60)
    finally:
        assert child.stdin is not None
        child.stdin.close()  # the server exits
        try:
            child.wait(10)
        finally:
            finish(child)
    assert totals["connections"] >= WORKERS
    assert totals["upgraded"] > 0, totals
    assert debug.live.snapshot() == counts_before
    local_pools().close_idle()  # (pools linger for the next connection)
    extra = open_fds() - fds_before
    assert not extra, {fd: _describe_fd(fd) for fd in extra}


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return str(exc)
