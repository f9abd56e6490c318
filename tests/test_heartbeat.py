"""Heartbeats (``aiocoloc.shm.heartbeat``): one thread beats every pool of
the process, retries deferred work while the lock is busy, runs it at once
when woken, and a stopped membership gets no callback after ``stop()``."""

from __future__ import annotations

import multiprocessing
import threading
import time

from aiocoloc.errors import PoolBusy
from aiocoloc.shm import MemfdSegment, Pool, PoolConfig
from aiocoloc.shm.heartbeat import DEFERRED_RETRY, Heartbeat

LEASE = 0.2
CONFIG = PoolConfig(slice_size=4096, max_members=4, max_pipes=8, max_slices_per_pipe=4, lease=LEASE)


def _beaters() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("aiocoloc-pool-heart")]


def _beats(pool: Pool) -> int:
    (me,) = [m for m in pool.members() if m["slot"] == pool.slot]
    return int(me["heartbeat"])


def test_one_thread_beats_every_pool_of_the_process() -> None:
    pools = [Pool.create(MemfdSegment.create(1 << 20), CONFIG) for _ in range(3)]
    try:
        assert _beaters() == ["aiocoloc-pool-heartbeats"]
        before = [_beats(p) for p in pools]
        time.sleep(3 * LEASE / 4 + 0.05)
        assert all(_beats(p) >= b + 2 for p, b in zip(pools, before, strict=True))
    finally:
        for pool in pools:
            pool.close()
    assert _beaters() == ["aiocoloc-pool-heartbeats"]  # kept for the next pool


def _recorder(
    calls: list[str], *, beat_for: float = 0.0, busy: int = 0, pending: bool = False
) -> Heartbeat:
    state = {"busy": busy, "pending": pending}

    def beat() -> None:
        calls.append("beat")
        time.sleep(beat_for)
        calls.append("beaten")

    def work() -> None:
        calls.append("work")
        if state["busy"]:
            state["busy"] -= 1
            raise PoolBusy("someone else holds it")
        state["pending"] = False

    return Heartbeat(0.05, beat=beat, pending=lambda: state["pending"], work=work, pool_name="test")


def test_no_callback_runs_after_stop_returns() -> None:
    calls: list[str] = []
    heartbeat = _recorder(calls, beat_for=0.1)
    heartbeat.start()
    deadline = time.monotonic() + 2
    while "beat" not in calls and time.monotonic() < deadline:
        time.sleep(0.001)
    heartbeat.stop()  # during the beat: waits for it
    assert calls[-1] == "beaten"
    seen = len(calls)
    time.sleep(0.2)  # four periods
    assert len(calls) == seen


def test_pending_work_is_tried_again_while_the_lock_is_busy() -> None:
    calls: list[str] = []
    heartbeat = _recorder(calls, busy=3, pending=True)
    start = time.monotonic()
    heartbeat.start()
    try:
        deadline = start + 2
        while calls.count("work") < 4 and time.monotonic() < deadline:
            time.sleep(0.001)
        elapsed = time.monotonic() - start
    finally:
        heartbeat.stop()
    assert calls.count("work") == 4  # three busy tries, then done: no more
    assert elapsed >= 3 * DEFERRED_RETRY * 0.9


def test_wake_runs_pending_work_before_the_next_beat() -> None:
    calls: list[str] = []
    state = {"pending": False}
    heartbeat = Heartbeat(
        60.0,
        beat=lambda: calls.append("beat"),
        pending=lambda: state["pending"],
        work=lambda: (calls.append("work"), state.update(pending=False)),
        pool_name="test",
    )
    heartbeat.start()
    try:
        time.sleep(0.05)
        state["pending"] = True
        heartbeat.wake()
        deadline = time.monotonic() + 2
        while "work" not in calls and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        heartbeat.stop()
    assert calls == ["work"]


def _beats_in_child(queue: multiprocessing.Queue[bool]) -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), CONFIG)
    try:
        before = _beats(pool)
        time.sleep(3 * LEASE / 4 + 0.05)
        queue.put(_beats(pool) >= before + 2 and _beaters() == ["aiocoloc-pool-heartbeats"])
    finally:
        pool.close()


def test_a_forked_child_beats_its_own_pools() -> None:
    """The parent's thread does not survive a fork: the child starts its own."""
    pool = Pool.create(MemfdSegment.create(1 << 20), CONFIG)  # the parent's thread runs
    try:
        context = multiprocessing.get_context("fork")
        queue: multiprocessing.Queue[bool] = context.Queue()
        child = context.Process(target=_beats_in_child, args=(queue,))
        child.start()
        assert queue.get(timeout=10) is True
        child.join(10)
        assert child.exitcode == 0
    finally:
        pool.close()
