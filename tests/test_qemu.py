"""End to end under QEMU (TCG): guests map a host POSIX shared memory pool as
an ivshmem device and exchange bytes with the host, and with each other,
through the project's own pool and pipes.  Skipped, with the reason, where
QEMU guests cannot run."""

from __future__ import annotations

import hashlib
import random
import sys
import time
import uuid
from pathlib import Path

import pytest

from aiocoloc.shm import Pool, PoolConfig, PosixShmSegment

from .conftest import SHM_PREFIX
from .qemu import harness

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
GUEST = ["tests/qemu/guest_member.py"]
POOL_SIZE, POOL_SIZE_QEMU = 4 << 20, "4M"  # ivshmem sizes are powers of two
CONFIG = PoolConfig(slice_size=16384, max_members=8, max_pipes=8, max_slices_per_pipe=64, lease=60)


@pytest.fixture(scope="module")
def qemu_ready() -> None:
    try:
        harness.prepare()
    except harness.QemuUnavailable as exc:
        pytest.skip(f"QEMU guests cannot run here: {exc}")


@pytest.fixture
def pool() -> Pool:
    name = f"/{SHM_PREFIX}-qemu-{uuid.uuid4().hex[:12]}"
    segment = PosixShmSegment.create(name, POOL_SIZE)
    created = Pool.create(segment, CONFIG)
    yield created
    created.close()  # the creator's ON_CLOSE policy removes the name


def boot(pool: Pool, *args: str) -> harness.Guest:
    return harness.start_guest(
        [sys.executable, *GUEST, *args], shm=pool.segment.name, size=POOL_SIZE_QEMU, cwd=REPO
    )  # type: ignore[attr-defined]


def wait_members(pool: Pool, count: int, guests: list[harness.Guest]) -> list[int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        others = [m["slot"] for m in pool.members() if m["slot"] != pool.slot]
        if len(others) == count:
            return others
        for guest in guests:
            if guest.process.poll() is not None:
                status, output = guest.wait(1)
                pytest.fail(f"guest exited early ({status}):\n{output[-3000:]}")
        time.sleep(0.2)
    pytest.fail("guests did not join the pool in time")


def test_host_and_guest_exchange_through_ivshmem(qemu_ready: None, pool: Pool) -> None:
    guest = boot(pool, "echo")
    try:
        (member,) = wait_members(pool, 1, [guest])
        out_h = pool.create_pipe(pool.slot, member, initial=4)
        back_h = pool.create_pipe(member, pool.slot, initial=4)
        producer, consumer = pool.pipe_producer(out_h), pool.pipe_consumer(back_h)
        payload = random.Random(5).randbytes(1 << 20)
        sent, echoed, resized = 0, bytearray(), False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if sent < len(payload):
                sent += producer.write(payload[sent : sent + 65536])
                if sent == len(payload):
                    producer.close()
            if not resized and sent > len(payload) // 2 and producer.can_resize():
                producer.resize(4, pool.allocate_slices(out_h, 8))  # grow mid-stream
                resized = True
            data = consumer.read()
            if data:
                echoed += data
            elif data == b"":
                break
            else:
                time.sleep(0.001)
        assert resized
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        status, output = guest.wait(120)
        assert status == 0, output[-3000:]
        assert f"GUEST: echoed {len(payload)} bytes" in output
        assert "ivshmem:" in output
        producer.release()
        consumer.release()
    finally:
        guest.kill()


def test_two_guests_exchange_through_ivshmem(qemu_ready: None, pool: Pool) -> None:
    source, echo = boot(pool, "source", str(256 * 1024), "11"), boot(pool, "echo")
    try:
        a, b = wait_members(pool, 2, [source, echo])
        pool.create_pipe(a, b, initial=4)
        pool.create_pipe(b, a, initial=4)
        results = [source.wait(400), echo.wait(400)]
        for status, output in results:
            assert status == 0, output[-3000:]
        assert "GUEST: round trip ok" in results[0][1]
        assert f"GUEST: echoed {256 * 1024} bytes" in results[1][1]
        assert len(pool.members()) == 1  # both guests left cleanly
        assert pool.stats()["slices_used"] == 0
    finally:
        source.kill()
        echo.kill()
