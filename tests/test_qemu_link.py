"""Several QEMU (TCG) guests on one guest-to-guest link through the host's L2 hub,
two of them also sharing an ivshmem-plain pool.  Skipped, with the reason, where
QEMU guests cannot run.  The hub itself is checked without QEMU."""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import SHM_DIR
from .qemu import harness
from .qemu.l2hub import L2Hub

REPO = Path(__file__).resolve().parent.parent
# -S: the guest script needs only the stdlib; skipping site saves guest start-up time.
GUEST = [sys.executable, "-S", "tests/qemu/guest_net_echo.py"]
POOL_SIZE, POOL_SIZE_QEMU = 1 << 20, "1M"  # ivshmem sizes are powers of two
ECHO_PORT, PAYLOAD = 7000, 1 << 20


@pytest.fixture
def shm_pool() -> Iterator[str]:
    """A zeroed POSIX shm file for ivshmem-plain; removed afterwards."""
    name = f"aiocoloc-test-link-{uuid.uuid4().hex[:12]}"
    path = Path(SHM_DIR) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, POOL_SIZE)
    finally:
        os.close(fd)
    try:
        yield name
    finally:
        path.unlink(missing_ok=True)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "hub closed the connection"
        data += chunk
    return data


def test_hub_copies_each_frame_to_every_other_port() -> None:
    with L2Hub() as hub:
        ports = [socket.create_connection(("127.0.0.1", hub.port), timeout=5) for _ in range(3)]
        try:
            deadline = time.monotonic() + 5
            while hub.connections < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            big = random.Random(1).randbytes(65535)
            # Split a frame across writes: the hub must reassemble it.
            ports[0].sendall(_frame(b"hello")[:3])
            time.sleep(0.05)
            ports[0].sendall(_frame(b"hello")[3:] + _frame(big))
            for other in ports[1:]:
                assert _recv_exactly(other, 9) == _frame(b"hello")
                assert _recv_exactly(other, 4 + len(big)) == _frame(big)
            ports[2].sendall(struct.pack(">I", 65536))  # too long: that port is dropped
            ports[2].settimeout(5)
            assert ports[2].recv(1) == b""
            ports[1].sendall(_frame(b"still"))
            assert _recv_exactly(ports[0], 9) == _frame(b"still")
            assert hub.dropped_connections == 1
        finally:
            for sock in ports:
                sock.close()


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_three_guests_share_one_link_and_two_share_a_pool(shm_pool: str) -> None:
    try:
        harness.prepare()
    except harness.QemuUnavailable as exc:
        pytest.skip(f"QEMU guests cannot run here: {exc}")
    net = random.randrange(1, 255)
    server = f"169.254.{net}.1"
    seeds = [random.randrange(1 << 30) for _ in range(2)]
    markers = {0: f"guest1-{uuid.uuid4().hex}", 4096: f"guest2-{uuid.uuid4().hex}"}
    (off1, mark1), (off2, mark2) = markers.items()
    with L2Hub() as hub:
        link = f"connect:{hub.port}"
        # All three boot at once (-smp 1 each on 2 cores); the clients retry
        # connecting until the server listens, so no start-up ordering is needed.
        specs = [
            (["server", server, str(ECHO_PORT), "2", "--marker", str(off1), mark1], shm_pool),
            ([*_client(server, seeds[0]), "--marker", str(off2), mark2], shm_pool),
            (_client(server, seeds[1]), None),
        ]
        started = time.monotonic()
        guests = [
            harness.start_guest(
                [*GUEST, *args],
                cwd=REPO,
                shm=shm,
                size=POOL_SIZE_QEMU,
                memory="512M",
                net=link,
                ip=f"169.254.{net}.{i}/16",
            )
            for i, (args, shm) in enumerate(specs, start=1)
        ]
        try:
            results = [guest.wait(300) for guest in guests]
            elapsed = time.monotonic() - started
        finally:
            for guest in guests:
                guest.kill()
    for i, (guest, (status, output)) in enumerate(zip(guests, results, strict=True), start=1):
        print(
            f"guest {i}: boot {_seconds(guest.boot_seconds)}, done {_seconds(guest.total_seconds)}"
        )
        assert status == 0, f"guest {i}:\n{output[-3000:]}"
    print(f"3 guests, start to all done: {elapsed:.1f} s; hub copied {hub.frames} frames")
    assert f"GUEST: served 2 clients, {2 * PAYLOAD} bytes" in results[0][1]
    for i in (1, 2):
        assert f"GUEST: echo ok {PAYLOAD} bytes from 169.254.{net}.{i + 1}" in results[i][1]
    pool = (Path(SHM_DIR) / shm_pool).read_bytes()
    assert pool[off1 : off1 + len(mark1)] == mark1.encode()
    assert pool[off2 : off2 + len(mark2)] == mark2.encode()


def _client(server: str, seed: int) -> list[str]:
    return ["client", server, str(ECHO_PORT), str(PAYLOAD), str(seed)]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
