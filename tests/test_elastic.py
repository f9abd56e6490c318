"""Elastic pipes in a pool: demand-driven resizing, and a byte stream that
survives many resizes between two processes."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from aiocoloc.shm import MemfdSegment, PipeHandle, Pool, PoolConfig, PosixShmSegment
from aiocoloc.shm.elastic import ElasticConfig, ElasticProducer

from .conftest import SHM_PREFIX

PEER = Path(__file__).with_name("pool_peer.py")


def test_hot_pipe_grows_idle_pipe_shrinks_then_returns_its_slices() -> None:
    pool = Pool.create(
        MemfdSegment.create(4 << 20), PoolConfig(slice_size=4096, max_slices_per_pipe=512, lease=60)
    )
    config = ElasticConfig(interval=0.01, smoothing=1.0)
    hot_h = pool.create_pipe(pool.slot, pool.slot, min_slices=1, initial=4)
    idle_h = pool.create_pipe(pool.slot, pool.slot, min_slices=2, initial=40)
    hot, idle = ElasticProducer(pool, hot_h, config), ElasticProducer(pool, idle_h, config)
    drain = pool.pipe_consumer(hot_h)
    idle_drain = pool.pipe_consumer(idle_h)
    chunk = bytes(65536)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        hot.write(chunk)
        drain.read()
        idle.tick()
        idle_drain.read()  # the idle pipe's consumer takes up new layouts
        if idle.capacity == 2 * 4096 and hot.capacity > 100 * 4096:
            break
    assert idle.capacity == 2 * 4096, "the idle pipe did not fall to its minimum"
    assert hot.capacity > 100 * 4096, f"the hot pipe only reached {hot.capacity}"
    owners = pool.slice_owners()
    assert owners.count(idle_h.slot) == 2
    assert sum(1 for o in owners if o >= 0) <= pool.geometry.slice_count
    # The hot pipe goes idle: its slices go back to the pool.
    deadline = time.monotonic() + 5
    while hot.capacity > 4096 and time.monotonic() < deadline:
        time.sleep(0.011)
        hot.tick()
        drain.read()
    hot.tick()
    assert hot.capacity == 4096
    assert pool.stats()["slices_used"] == 3
    for end in (hot, idle):
        end.close()
    pool.close()


def test_demand_and_targets_are_published() -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=4096, lease=60))
    handle = pool.create_pipe(pool.slot, pool.slot)
    producer = ElasticProducer(pool, handle, ElasticConfig(interval=0.001))
    consumer = pool.pipe_consumer(handle)
    assert producer.write(b"x" * 10000) == 4096  # blocked: the pipe holds one slice
    time.sleep(0.002)
    consumer.read()
    producer.write(b"y" * 100)
    producer.tick()  # the write path itself looks at the clock every 64 writes
    info = pool.pipes()[0]
    assert info.offered_bytes == 4196
    assert info.blocked_ns > 1_000_000
    assert info.target_slices > 1
    producer.close()
    pool.close()


@pytest.mark.timeout(240)
def test_stream_survives_many_resizes_between_processes() -> None:
    name = f"/{SHM_PREFIX}-test-{uuid.uuid4().hex[:12]}"
    pool = Pool.open_posix(
        name, 8 << 20, PoolConfig(slice_size=4096, max_slices_per_pipe=64, lease=5)
    )
    child = subprocess.Popen(
        [sys.executable, str(PEER), "consume", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        consumer_slot = json.loads(child.stdout.readline())["slot"]
        handle = pool.create_pipe(pool.slot, consumer_slot, min_slices=1, initial=3)
        child.stdin.write(f"{handle.slot} {handle.generation}\n")
        child.stdin.flush()
        producer = pool.pipe_producer(handle)
        sent, resizes = stream_with_random_resizes(pool, handle, producer, 48 << 20)
        producer.close()
        result = json.loads(child.stdout.readline())
        assert child.wait(timeout=60) == 0
        assert result["bytes"] == 48 << 20
        assert result["sha256"] == sent
        assert resizes >= 100, resizes
        producer.release()
        pool.destroy_pipe(handle)
        assert pool.stats()["slices_used"] == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        pool.close()
        PosixShmSegment.attach(name).unlink()


def stream_with_random_resizes(
    pool: Pool, handle: PipeHandle, producer: object, total: int
) -> tuple[str, int]:
    """Send ``total`` random bytes, resizing the pipe at random all along."""
    rng = random.Random(7)
    digest = hashlib.sha256()
    pending: list[int] = []
    resizes = sent = idle = 0
    block = rng.randbytes(1 << 20)
    while sent < total:
        size = min(total - sent, rng.choice([1, 100, 4096, 30000, 200000]))
        start = sent % len(block)
        data = (
            (block + block)[start : start + size]
            if start + size > len(block)
            else block[start : start + size]
        )
        view = memoryview(data)
        while view:
            n = producer.write(view)  # type: ignore[attr-defined]
            if n:
                digest.update(view[:n])
                view = view[n:]
                sent += n
                idle = 0
            else:
                idle += 1
                time.sleep(0) if idle < 1000 else time.sleep(0.0002)
            if pending and producer.switch_complete():  # type: ignore[attr-defined]
                pool.release_slices(handle, pending)
                pending = []
            if not pending and rng.random() < 0.05 and producer.can_resize():  # type: ignore[attr-defined]
                current = len(producer.slices)  # type: ignore[attr-defined]
                target = rng.randint(1, 24)
                if target > current:
                    added = pool.allocate_slices(handle, target - current)
                    if added:
                        producer.resize(current, added)  # type: ignore[attr-defined]
                        resizes += 1
                elif target < current:
                    _, pending = producer.resize(target)  # type: ignore[attr-defined]
                    resizes += 1
    while pending and not producer.switch_complete():  # type: ignore[attr-defined]
        time.sleep(0.001)
    if pending:
        pool.release_slices(handle, pending)
    return digest.hexdigest(), resizes
