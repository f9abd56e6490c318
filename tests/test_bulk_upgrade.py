"""A writer that never yields to the event loop still upgrades.

``for chunk in ...: writer.write(chunk); await writer.drain()`` never yields
while the transport is not paused, so an upgrade scheduled on the loop would
never run.  Each case writes a bulk stream to a reading process with the
default policy (``auto``: upgrade after 64 KiB of traffic) and checks that
the writer's direction is on shared memory within a bound after the
threshold, and that every byte arrives (sha256).  Both directions: a client
that only writes, a server that only writes; both loops; three write sizes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import aiocoloc
from aiocoloc.connect.policy import AUTO_UPGRADE_AFTER

from .peers import finish, line, spawn
from .test_transport import LOOPS, run

PEER = Path(__file__).with_name("bulk_peer.py")
#: The bound stated in the README: a writer that never yields is on shared
#: memory within this much time after the policy's threshold (5-45 ms here,
#: measured by this test; generous for a noisy 2-core machine) ...
UPGRADE_WITHIN_S = 0.25
#: ... or within this much further traffic (what 64 B writes move in that time).
UPGRADE_WITHIN_BYTES = 1 << 20
#: Bytes written per case, by write size: enough to pass the bounds.
TOTAL = {64: 6 << 20, 65536: 64 << 20, 1 << 20: 96 << 20}


@dataclass
class Outcome:
    upgraded_at: int | None  # bytes written when the direction was on shm
    seconds_after_threshold: float | None
    digest: str
    nudges: int
    info: dict[str, object]  # get_extra_info("aiocoloc") at the end


async def write_bulk(writer: asyncio.StreamWriter, size: int) -> Outcome:
    """Write ``TOTAL[size]`` bytes with write(); await drain() only."""
    chunk = os.urandom(size)
    digest = hashlib.sha256()
    transport = writer.transport
    written, upgraded_at, crossed, after = 0, None, 0.0, None
    # Look at the mode every 64 KiB: the same cost whatever the write size.
    every = max(1, 65536 // size)
    for i in range(TOTAL[size] // size):
        writer.write(chunk)
        await writer.drain()
        digest.update(chunk)
        written += size
        if upgraded_at is None and i % every == 0:
            if not crossed and written >= AUTO_UPGRADE_AFTER:
                crossed = time.monotonic()
            if transport.get_extra_info("aiocoloc")["mode"] == "shm":
                upgraded_at, after = written, time.monotonic() - crossed
    writer.write_eof()
    nudges = getattr(transport, "nudges", 0)
    info = transport.get_extra_info("aiocoloc")
    return Outcome(upgraded_at, after, digest.hexdigest(), nudges, info)


def check(outcome: Outcome, report: dict[str, object], size: int) -> None:
    assert outcome.upgraded_at is not None, f"the writer's direction never left TCP: {outcome}"
    assert report == {"sha256": outcome.digest, "bytes": TOTAL[size], "mode": "shm"}
    assert outcome.seconds_after_threshold is not None
    assert (
        outcome.seconds_after_threshold <= UPGRADE_WITHIN_S
        or outcome.upgraded_at - AUTO_UPGRADE_AFTER <= UPGRADE_WITHIN_BYTES
    ), outcome


@pytest.mark.parametrize("size", list(TOTAL))
@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_a_client_that_only_writes_upgrades(loop_kind: str, size: int) -> None:
    async def scenario() -> tuple[Outcome, dict[str, object]]:
        child = spawn(PEER, "server", loop_kind)
        try:
            port = int(await line(child))
            _, writer = await aiocoloc.open_connection("127.0.0.1", port)
            outcome = await write_bulk(writer, size)
            report = json.loads(await line(child))
            writer.close()
            await writer.wait_closed()
            return outcome, report
        finally:
            finish(child)

    check(*run(loop_kind, scenario, timeout=60), size)


@pytest.mark.parametrize("size", list(TOTAL))
@pytest.mark.parametrize("loop_kind", list(LOOPS))
def test_a_server_that_only_writes_upgrades(loop_kind: str, size: int) -> None:
    async def scenario() -> tuple[Outcome, dict[str, object]]:
        outcomes: asyncio.Queue[Outcome] = asyncio.Queue()

        closed = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await outcomes.put(await write_bulk(writer, size))
            await reader.read()  # the client closes once it has read everything
            writer.close()
            await writer.wait_closed()
            closed.set()

        server = await aiocoloc.start_server(handle, "127.0.0.1", 0)
        child = spawn(PEER, "client", loop_kind, str(server.sockets[0].getsockname()[1]))
        try:
            outcome = await outcomes.get()
            report = json.loads(await line(child))
            await asyncio.wait_for(closed.wait(), 10)
            return outcome, report
        finally:
            finish(child)
            server.close()
            await server.wait_closed()

    check(*run(loop_kind, scenario, timeout=60), size)
