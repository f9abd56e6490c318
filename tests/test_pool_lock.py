"""No pool operation blocks an event loop: a same-user peer that holds the
allocator lock and keeps bumping its counter (so it is never taken over)
stalls neither a connection's upgrade nor its close, nor joining or leaving
a pool; the work is done once the lock frees."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import aiocoloc
from aiocoloc.connect.colocation import LocalPools, local_pools
from aiocoloc.errors import PoolBusy
from aiocoloc.shm import MemfdSegment, Pool, PoolConfig
from aiocoloc.transport import fallback

from .conftest import open_fds
from .test_connect import echo, fell_back, info, no_pools_in_use, roundtrip, until, upgraded
from .test_transport import LOOPS, run

PEER = Path(__file__).with_name("pool_peer.py")
#: The longest stall of the event loop allowed (generous: a noisy machine).
STALL_BOUND = 0.1


@pytest.fixture(params=list(LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def hostile_holder(pool: Pool) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``pool``'s allocator lock until the block ends
    (or until its stdin is closed)."""
    fd = pool.segment.fd
    child = subprocess.Popen(
        [sys.executable, str(PEER), "hostile-lock", str(fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(fd,),
    )
    try:
        assert child.stdout is not None
        assert json.loads(child.stdout.readline())["locked"]
        yield child
    finally:
        free(child)


def free(child: subprocess.Popen[str]) -> None:
    """Make the hostile holder let go of the lock and leave."""
    assert child.stdin is not None and child.stdout is not None
    if not child.stdin.closed:
        child.stdin.close()
    assert child.wait(timeout=30) == 0
    child.stdout.close()


class StallMeter:
    """The event loop's longest stall, seen by a task that sleeps 1 ms at a time."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.longest = max(self.longest, time.perf_counter() - before - 0.001)

    async def stop(self) -> float:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.longest


def test_upgrade_and_close_never_wait_for_a_hostile_lock_holder(loop_kind: str) -> None:
    fds = open_fds()

    async def scenario() -> float:
        server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r0, w0 = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(w0)
        pool = local_pools().get(info(w0)["pool"])
        assert pool is not None and pool.stats()["pipes"] == 2
        with hostile_holder(pool) as holder:
            meter = StallMeter()
            # A connection upgrading now cannot get pipes: it stays on TCP, at once.
            r1, w1 = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            assert await fell_back(w1) == fallback.POOL_EXHAUSTED
            assert "allocator lock" in info(w1)["fallback_detail"]
            await roundtrip(r1, w1, 1000)
            # Traffic on the upgraded one: its pipes want to grow (resize steps
            # find the lock busy and wait for the next interval).
            for _ in range(20):
                await roundtrip(r0, w0, 200_000)
            # It closes: its pipes cannot be freed now.
            w0.close()
            await w0.wait_closed()
            await asyncio.sleep(0.3)  # the server side closes; resize timers run
            stall = await meter.stop()
            assert pool.stats()["pipes"] == 2  # still there: deferred
            free(holder)
        # The lock is free: the pool's thread frees the pipes, and a new
        # connection upgrades.
        await until(lambda: pool.stats()["pipes"] == 0, "the deferred frees")
        r2, w2 = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
        await upgraded(w2)
        await roundtrip(r2, w2, 100_000)
        for writer in (w1, w2):
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        await until(lambda: pool.stats()["pipes"] == 0, "the last pipes freed")
        assert pool.stats()["slices_used"] == 0
        return stall

    stall = run(loop_kind, scenario)
    assert stall < STALL_BOUND, f"the event loop stalled for {stall * 1000:.0f} ms"
    no_pools_in_use()
    assert open_fds() <= fds, sorted(open_fds() - fds)


def test_joining_and_leaving_never_wait_for_a_hostile_lock_holder() -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=4096, lease=5))
    fds = open_fds()

    async def scenario() -> None:
        fds_in_loop = open_fds()  # the loop's own descriptors included
        other = Pool.attach(MemfdSegment.from_fd(os.dup(pool.segment.fd)))
        with hostile_holder(pool) as holder:
            # Joining (a client attaching the server's pool): fails fast.
            pools = LocalPools()
            start = time.perf_counter()
            with pytest.raises(PoolBusy, match="allocator lock not acquired"):
                pools.attach(os.dup(pool.segment.fd), str(pool.id))
            assert time.perf_counter() - start < STALL_BOUND
            assert pools.open_pools() == []
            # Leaving (the last connection gone): a thread of ours finishes it.
            assert len(pool.members()) == 3  # we, the holder, the other
            start = time.perf_counter()
            other.close()
            assert time.perf_counter() - start < STALL_BOUND
            assert other.closed
            assert len(pool.members()) == 3  # not yet: the lock is held
            free(holder)
        await until(lambda: len(pool.members()) == 1, "the deferred leave")
        await until(lambda: open_fds() <= fds_in_loop, "the pool unmapped and closed")

    run("asyncio", scenario)
    assert open_fds() <= fds, sorted(open_fds() - fds)
    pool.close()


def test_freeing_a_pipe_from_the_loop_is_deferred_while_the_lock_is_held() -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=4096, lease=5))
    handle = pool.create_pipe(pool.slot, pool.slot, min_slices=3)

    async def scenario() -> None:
        with hostile_holder(pool) as holder:
            start = time.perf_counter()
            assert pool.destroy_pipe(handle) == 0  # deferred
            assert time.perf_counter() - start < STALL_BOUND
            assert pool.stats()["slices_used"] == 3
            free(holder)
        await until(lambda: pool.stats()["slices_used"] == 0, "the deferred free")
        assert pool.stats()["pipes"] == 0

    run("asyncio", scenario)
    pool.close()


def test_a_busy_lock_off_the_loop_still_waits_its_timeout() -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=4096, lease=5))
    handle = pool.create_pipe(pool.slot, pool.slot)
    with hostile_holder(pool):
        start = time.perf_counter()
        with pytest.raises(PoolBusy):
            with pool.locked(timeout=0.2):
                pass
        assert time.perf_counter() - start >= 0.2
    assert pool.destroy_pipe(handle) == 1  # off the loop: at once, once the lock is free
    pool.close()


def test_a_background_waiter_does_not_burn_a_core() -> None:
    """A thread that may wait a whole lease for the lock (a holder that died
    holding it) pauses between its short tries instead of spinning."""
    pool = Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=4096, lease=5))
    with hostile_holder(pool):
        cpu = time.thread_time()
        with pytest.raises(PoolBusy):
            with pool.locked(timeout=1.0):
                pass
        used = time.thread_time() - cpu
    assert used < 0.3, f"waiting 1 s for the lock used {used:.2f} s of CPU"
    pool.close()
