"""Pools: creating and attaching across processes, membership, leases and
reclaim, the allocator lock, header validation, exhaustion, and churn."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from aiocoloc.errors import PoolError, PoolExhausted
from aiocoloc.shm import MemfdSegment, Pool, PoolConfig, PosixShmSegment

from .conftest import FUZZ_SCALE, SHM_PREFIX

PEER = Path(__file__).with_name("pool_peer.py")
SMALL = PoolConfig(slice_size=4096, max_members=16, max_pipes=32, max_slices_per_pipe=16, lease=0.5)


def shm_name() -> str:
    return f"/{SHM_PREFIX}-test-{uuid.uuid4().hex[:12]}"


def peer(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PEER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, f"peer exited early with {proc.wait()}"
    result: dict[str, object] = json.loads(text)
    return result


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def posix_pool() -> Iterator[Pool]:
    name = shm_name()
    pool = Pool.open_posix(name, 1 << 20, SMALL)
    yield pool
    pool.close()
    PosixShmSegment.attach(name).unlink()


def test_memfd_pool_shared_with_another_process() -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), SMALL)
    child = peer("memfd", str(pool.segment.fd), pass_fds=(pool.segment.fd,))
    try:
        seen = line(child)
        assert seen["id"] == str(pool.id)
        assert seen["slot"] != pool.slot
        assert seen["members"] == 2
        assert {m["pid"] for m in pool.members()} == {os.getpid(), child.pid}
    finally:
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    assert len(pool.members()) == 1  # it left cleanly
    pool.close()


def test_eight_processes_create_one_pool() -> None:
    name = shm_name()
    procs = [peer("join", name, str(1 << 20), "2.0") for _ in range(8)]
    try:
        seen = [line(p) for p in procs]
        assert len({s["id"] for s in seen}) == 1, "more than one pool was formatted"
        assert sum(1 for s in seen if s["created"]) == 1
        assert len({s["slot"] for s in seen}) == 8
        pool = Pool.attach(PosixShmSegment.attach(name))
        assert len(pool.members()) == 9
        pool.close()
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
        statuses = [p.wait(timeout=30) for p in procs]
        PosixShmSegment.attach(name).unlink()
    assert statuses == [0] * 8


def test_killed_member_slices_reclaimed_within_lease(posix_pool: Pool) -> None:
    child = peer("hold-slices", posix_pool.segment.name, "3")  # type: ignore[attr-defined]
    try:
        held = line(child)
        assert posix_pool.stats()["slices_used"] == held["used"] == 6
    finally:
        stop(child)  # SIGKILL
    start = time.monotonic()
    while posix_pool.stats()["slices_used"] and time.monotonic() - start < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    assert posix_pool.stats() == {
        "members": 1,
        "pipes": 0,
        "slices": posix_pool.geometry.slice_count,
        "slices_used": 0,
        "open_ends": 0,
    }
    # within a lease (0.5 s) of our noticing, plus one heartbeat period
    assert elapsed < posix_pool.lease * 2.5, elapsed


def test_killed_lock_holder_cannot_wedge_the_pool(posix_pool: Pool) -> None:
    child = peer("hold-lock", posix_pool.segment.name)  # type: ignore[attr-defined]
    try:
        assert line(child)["locked"]
        with pytest.raises(PoolError, match="not acquired in 0.1 s"):
            with posix_pool.locked(timeout=0.1):
                pass
    finally:
        stop(child)
    start = time.monotonic()
    handle = posix_pool.create_pipe(posix_pool.slot, posix_pool.slot)  # waits, then takes over
    assert time.monotonic() - start < posix_pool.lease * 3
    posix_pool.destroy_pipe(handle)


def test_pipe_with_live_peer_is_closed_not_freed(posix_pool: Pool) -> None:
    other = Pool.attach(PosixShmSegment.attach(posix_pool.segment.name))  # type: ignore[attr-defined]
    handle = posix_pool.create_pipe(posix_pool.slot, other.slot, min_slices=2)
    producer = posix_pool.pipe_producer(handle)
    consumer = other.pipe_consumer(handle)
    producer.write(b"last words")
    posix_pool.close()  # the producer leaves
    assert consumer.read() == b"last words"
    assert consumer.at_eof()
    assert other.stats()["slices_used"] == 2  # kept until the consumer lets go
    consumer.release()
    assert other.destroy_pipe(handle) == 2
    assert other.stats()["slices_used"] == 0
    other.close()


def test_creator_dying_while_formatting_does_not_wedge_the_name() -> None:
    name = shm_name()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    seg = PosixShmSegment.create(name, 1 << 20)
    region = seg.map()
    region[12:16] = (1).to_bytes(4, "little")  # state: formatting ...
    region[104:108] = dead.pid.to_bytes(4, "little")  # ... by a process now dead
    region.close()
    pool = Pool.open_posix(name, 1 << 20, SMALL, timeout=0.2)
    assert pool.segment.identity == seg.identity and len(pool.members()) == 1
    pool.close()
    seg.close()


def test_attach_refuses_what_is_not_a_ready_pool() -> None:
    blank = MemfdSegment.create(1 << 20)
    with pytest.raises(PoolError, match=r"not a ready pool after 0.1 s: blank"):
        Pool.attach(blank, timeout=0.1, close_segment=False)
    pool = Pool.create(blank, SMALL, close_segment=False)
    with pytest.raises(PoolError, match="already a pool"):
        Pool.create(blank, SMALL, close_segment=False)
    region = blank.map()
    region[8:12] = (9).to_bytes(4, "little")
    with pytest.raises(PoolError, match="layout version 9 is not supported"):
        Pool.attach(blank, close_segment=False)
    region[8:12] = (1).to_bytes(4, "little")
    region[88:96] = (12345).to_bytes(8, "little")  # data offset that our arithmetic disagrees with
    with pytest.raises(PoolError, match="inconsistent"):
        Pool.attach(blank, close_segment=False)
    region[:8] = b"NOTAPOOL"
    with pytest.raises(PoolError, match="is not a pool: magic b'NOTAPOOL'"):
        Pool.attach(blank, close_segment=False)
    region.close()
    pool.close()
    blank.close()


def test_a_closed_pool_refuses_work_clearly() -> None:
    pool = Pool.create(MemfdSegment.create(1 << 20), SMALL)
    handle = pool.create_pipe(pool.slot, pool.slot)
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(PoolError, match="is closed"):
        pool.destroy_pipe(handle)
    with pytest.raises(PoolError, match="is closed"):
        pool.create_pipe(0, 0)
    with pytest.raises(PoolError, match="is closed"):
        pool.pipe_producer(handle)


def test_geometry_errors() -> None:
    with pytest.raises(PoolError, match="no room for a slice"):
        Pool.create(MemfdSegment.create(8192), SMALL)
    with pytest.raises(PoolError, match="power of two"):
        Pool.create(MemfdSegment.create(1 << 20), PoolConfig(slice_size=5000))


def test_exhaustion_is_reported(posix_pool: Pool) -> None:
    g = posix_pool.geometry
    big = g.max_slices_per_pipe
    for _ in range(g.slice_count // big):
        posix_pool.create_pipe(0, 0, min_slices=big)
    with pytest.raises(
        PoolExhausted, match=f"has {g.slice_count % big} free slices, a new pipe needs {big}"
    ):
        posix_pool.create_pipe(0, 0, min_slices=big)
    assert posix_pool.stats()["slices_used"] == g.slice_count // big * big  # nothing half-made
    for info in posix_pool.pipes():
        posix_pool.destroy_pipe(info.handle)
    handles = [posix_pool.create_pipe(0, 0) for _ in range(g.max_pipes)]
    with pytest.raises(PoolExhausted, match="no free pipe entry"):
        posix_pool.create_pipe(0, 0)
    for h in handles:
        posix_pool.destroy_pipe(h)
    with pytest.raises(PoolError, match="no longer exists"):
        posix_pool.destroy_pipe(handles[0])
    with pytest.raises(ValueError, match="min_slices"):
        posix_pool.create_pipe(0, 0, min_slices=0)
    members = [
        Pool.attach(PosixShmSegment.attach(posix_pool.segment.name))  # type: ignore[attr-defined]
        for _ in range(g.max_members - 1)
    ]
    with pytest.raises(PoolExhausted, match="no free member slot"):
        Pool.attach(PosixShmSegment.attach(posix_pool.segment.name))  # type: ignore[attr-defined]
    for m in members:
        m.close()


def test_ends_belong_to_their_members(posix_pool: Pool) -> None:
    with pytest.raises(PoolError, match="member 5 is not attached"):
        posix_pool.create_pipe(posix_pool.slot, 5)
    other = Pool.attach(PosixShmSegment.attach(posix_pool.segment.name))  # type: ignore[attr-defined]
    handle = posix_pool.create_pipe(posix_pool.slot, other.slot)
    producer = posix_pool.pipe_producer(handle)
    with pytest.raises(
        PoolError, match=f"consumer is member {other.slot}, we are {posix_pool.slot}"
    ):
        posix_pool.pipe_consumer(handle)
    assert posix_pool.stats()["open_ends"] == 1
    producer.release()
    assert posix_pool.stats()["open_ends"] == 0
    other.close()


# --- churn ---------------------------------------------------------------------------


class PoolChurn(RuleBasedStateMachine):
    """Members come and go, pipes are made, grown, shrunk and destroyed."""

    @initialize()
    def setup(self) -> None:
        self.segment = MemfdSegment.create(256 * 1024)
        self.config = PoolConfig(
            slice_size=4096, max_members=6, max_pipes=12, max_slices_per_pipe=8, lease=60
        )
        self.members = [Pool.create(self.segment, self.config, close_segment=False)]
        self.ends: dict[tuple[int, int], object] = {}

    @rule(data=st.data())
    def join_or_leave(self, data: st.DataObject) -> None:
        if len(self.members) < 5 and data.draw(st.booleans()):
            self.members.append(Pool.attach(self.segment, close_segment=False))
        elif len(self.members) > 1:
            leaving = self.members.pop(data.draw(st.integers(0, len(self.members) - 1)))
            for key in [k for k, end in self.ends.items() if getattr(end, "released", True)]:
                del self.ends[key]
            leaving.close()

    @rule(data=st.data(), first=st.integers(1, 4))
    def create(self, data: st.DataObject, first: int) -> None:
        a = data.draw(st.sampled_from(self.members))
        b = data.draw(st.sampled_from(self.members))
        try:
            handle = a.create_pipe(a.slot, b.slot, min_slices=1, initial=first)
        except PoolExhausted:
            return
        self.ends[(handle.slot, handle.generation)] = a.pipe_producer(handle)

    @rule(data=st.data(), grow=st.integers(-4, 4))
    def resize(self, data: st.DataObject, grow: int) -> None:
        live = [(k, e) for k, e in self.ends.items() if not getattr(e, "released", True)]
        if not live:
            return
        (slot, generation), end = data.draw(st.sampled_from(live))
        owner = next(m for m in self.members if m.stats()["open_ends"] and end in m._ends)
        from aiocoloc.shm import PipeHandle

        handle = PipeHandle(slot, generation)
        if not end.can_resize():  # type: ignore[attr-defined]
            return
        current = len(end.slices)  # type: ignore[attr-defined]
        if grow > 0:
            try:
                added = owner.allocate_slices(handle, grow)
            except PoolError as exc:  # its consumer left: the pipe is closing
                assert "no longer exists" in str(exc)
                assert end.peer_closed  # type: ignore[attr-defined]
                return
            if added:
                end.resize(current, added)  # type: ignore[attr-defined]
        elif grow < 0 and current + grow >= 1 and not end.peer_closed:  # type: ignore[attr-defined]
            _, dropped = end.resize(current + grow)  # type: ignore[attr-defined]
            assert end.switch_complete()  # type: ignore[attr-defined]  # empty pipe
            owner.release_slices(handle, dropped)

    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        infos = self.members[0].pipes()
        if infos:
            info = data.draw(st.sampled_from(infos))
            end = self.ends.pop((info.handle.slot, info.handle.generation), None)
            if end is not None:
                end.release()  # type: ignore[attr-defined]
            self.members[0].destroy_pipe(info.handle)

    @invariant()
    def never_overcommitted(self) -> None:
        if not hasattr(self, "members"):
            return
        pool = self.members[0]
        owners = pool.slice_owners()
        infos = {i.handle.slot: i for i in pool.pipes()}
        assert all(o == -1 or o in infos for o in owners), "a slice owned by a dead pipe"
        for slot, info in infos.items():
            assert info.owned_slices == owners.count(slot) <= info.max_slices
        for (slot, _), end in self.ends.items():
            if getattr(end, "released", True):
                continue
            # a layout only names slices its pipe owns: none is in two pipes
            assert all(owners[i] == slot for i in end.slices)  # type: ignore[attr-defined]
        assert sum(i.owned_slices for i in infos.values()) <= pool.geometry.slice_count

    def teardown(self) -> None:
        if hasattr(self, "members"):
            for member in self.members:
                member.close()
            self.segment.close()


TestPoolChurn = PoolChurn.TestCase
TestPoolChurn.settings = settings(
    max_examples=40 * FUZZ_SCALE, stateful_step_count=30, deadline=None
)


LEAVER = """
import os, sys
from aiocoloc.shm import MemfdSegment, Pool
for _ in range(int(sys.argv[2])):
    Pool.attach(MemfdSegment.from_fd(os.dup(int(sys.argv[1])))).close()
"""


def test_members_leaving_are_not_taken_for_dead_lock_holders(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leaving member gives up its slot just before it unlocks: others must
    not mistake it for a dead holder and "repair" tables under its feet."""
    pool = Pool.create(MemfdSegment.create(1 << 20), SMALL)
    try:
        leaver = subprocess.Popen(
            [sys.executable, "-c", LEAVER, str(pool.segment.fd), "150"],
            pass_fds=(pool.segment.fd,),
            stderr=subprocess.PIPE,
            text=True,
        )
        with caplog.at_level(logging.WARNING, logger="aiocoloc.shm"):
            while leaver.poll() is None:
                pool.destroy_pipe(pool.create_pipe(pool.slot, pool.slot))
        _, errors = leaver.communicate()
        assert leaver.returncode == 0, errors
        assert "took the lock over" not in errors
        assert not [r for r in caplog.records if "took the lock" in r.getMessage()]
        assert pool.stats()["members"] == 1
    finally:
        pool.close()
