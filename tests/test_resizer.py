"""The pool resizer: one look at the pipe table per pool and interval, however
many pipes are busy; its timer stops when they all go idle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from aiocoloc.shm import MemfdSegment, PipeInfo, Pool, PoolConfig
from aiocoloc.shm import resizer as resizer_module
from aiocoloc.shm.allocation import shareable_slices
from aiocoloc.shm.elastic import ElasticConfig, ElasticProducer
from aiocoloc.shm.resizer import Enrollment, resizer_for

CONFIG = ElasticConfig(interval=0.02, smoothing=1.0)


@pytest.fixture
def pool() -> Iterator[Pool]:
    pool = Pool.create(
        MemfdSegment.create(8 << 20),
        PoolConfig(slice_size=4096, max_pipes=256, max_slices_per_pipe=64, lease=60),
    )
    yield pool
    pool.close()


class Writer:
    """A transport's part in miniature: writes, enrolls when not enrolled."""

    def __init__(self, pool: Pool) -> None:
        handle = pool.create_pipe(pool.slot, pool.slot, min_slices=1)
        self.producer = ElasticProducer(pool, handle, CONFIG)
        self.consumer = pool.pipe_consumer(handle)
        self.enrollment: Enrollment | None = None
        self.idled = 0

    def write(self, loop: asyncio.AbstractEventLoop) -> None:
        self.producer.end.write(bytes(512))
        self.consumer.read()
        if self.enrollment is None:  # the write path's one check
            resizer = resizer_for(self.producer.pool, loop, CONFIG)
            self.enrollment = resizer.enroll(self.producer, self.stopped)

    def stopped(self) -> None:
        self.enrollment = None
        self.idled += 1

    def close(self) -> None:
        self.producer.close()
        self.producer.release()
        self.consumer.release()


@pytest.mark.parametrize("pipes", [1, 10, 100])
def test_one_table_read_per_pool_and_interval_however_many_pipes(
    pool: Pool, pipes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    real_pipes = pool.pipes

    def counted() -> list[PipeInfo]:
        nonlocal reads
        reads += 1
        return real_pipes()

    monkeypatch.setattr(pool, "pipes", counted)
    writers = [Writer(pool) for _ in range(pipes)]

    async def scenario() -> tuple[int, int, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 0.5:  # all busy for 25 intervals
            for writer in writers:
                writer.write(loop)
            await asyncio.sleep(0.002)
        busy_for = loop.time() - start
        resizer = resizer_for(pool, loop, CONFIG)
        ticks = resizer.ticks
        assert resizer.enrolled == pipes
        # Idle now: every pipe is let go and the timer stops.
        for _ in range(100):
            await asyncio.sleep(CONFIG.interval)
            if all(w.enrollment is None for w in writers):
                break
        assert all(w.enrollment is None and w.idled == 1 for w in writers)
        assert not resizer_module._resizers, "an idle resizer kept its timer"
        return ticks, resizer.ticks, busy_for

    busy_ticks, ticks, busy_for = asyncio.run(scenario())
    # One table read per tick, and one tick per interval for the whole pool
    # (the loop may run late on a busy machine: fewer ticks, never more).
    assert reads == ticks
    assert 3 <= busy_ticks <= busy_for / CONFIG.interval + 1
    # Every enrolled pipe was stepped from those reads: its demand and target
    # are in the table.
    assert all(info.offered_bytes > 0 and info.target_slices >= 1 for info in real_pipes())
    for writer in writers:
        writer.close()


def test_busy_pipes_share_the_pool_in_proportion(pool: Pool) -> None:
    """The resizer moves each of its pipes toward its proportional target:
    a hot pipe grows, one that went quiet falls back to its minimum."""
    hot, quiet = Writer(pool), Writer(pool)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        quiet.write(loop)
        start = loop.time()
        while loop.time() - start < 0.4:
            for _ in range(20):
                hot.write(loop)
            quiet.consumer.read()  # takes up the quiet pipe's new layouts
            await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert len(hot.producer.end.slices) > 8
    assert len(quiet.producer.end.slices) == 1
    for writer in (hot, quiet):
        writer.close()


def test_a_destroyed_pipe_is_let_go(pool: Pool) -> None:
    writer, other = Writer(pool), Writer(pool)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        writer.write(loop)
        other.write(loop)
        writer.producer.release()
        writer.consumer.release()
        pool.destroy_pipe(writer.producer.handle)
        for _ in range(50):
            await asyncio.sleep(CONFIG.interval)
            other.write(loop)  # keeps the resizer ticking
            if writer.enrollment is None:
                break
        assert writer.enrollment is None and writer.idled == 1
        assert other.enrollment is not None
        other.enrollment.cancel()  # a closing connection: no on_idle
        assert not resizer_module._resizers

    asyncio.run(scenario())
    assert other.idled == 0
    other.close()


def test_busy_pipes_leave_room_for_new_ones() -> None:
    """However busy the pipes are, their shares leave the newcomers' part of
    the pool free: a new connection still gets its pipes."""
    pool = Pool.create(
        MemfdSegment.create(4 << 20),
        PoolConfig(slice_size=16384, max_pipes=64, max_slices_per_pipe=1024, lease=60),
    )
    total = pool.geometry.slice_count
    hot = [Writer(pool) for _ in range(3)]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 0.5:
            for writer in hot:
                for _ in range(20):
                    writer.write(loop)
            await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert sum(len(w.producer.end.slices) for w in hot) > total // 2  # they did grow
    free = pool.free_slice_count()
    # The newcomers' sixteenth of the pool, less rounding.
    assert free >= max(total - shareable_slices(total) - len(hot), total // 20), (free, total)
    newcomers = [pool.create_pipe(pool.slot, pool.slot) for _ in range(total // 20)]
    for handle in newcomers:
        pool.destroy_pipe(handle)
    for writer in hot:
        writer.close()
    pool.close()
