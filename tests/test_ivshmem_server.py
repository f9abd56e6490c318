"""The ivshmem server against fake QEMU peers: the messages of protocol version
0 with their descriptors (SCM_RIGHTS), peers told about each other and about
disconnects, the shared memory, refusals, and the command line."""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from aiocoloc.cli.ivshmem_server import IvshmemServer
from aiocoloc.errors import SegmentError
from aiocoloc.shm.segments import PosixShmSegment

SIZE = 1 << 16
REPO = Path(__file__).resolve().parent.parent


class FakePeer:
    """What QEMU does on the socket: connect, then only read."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.fds: list[int] = []

    async def receive(self) -> tuple[int, int | None]:
        """One message: (value, descriptor or None)."""
        data, fds, _, _ = await asyncio.to_thread(socket.recv_fds, self.sock, 8, 1)
        assert len(data) == 8, f"short message {data!r}"
        self.fds.extend(fds)
        return struct.unpack("<q", data)[0], (fds[0] if fds else None)

    async def receive_hello(self) -> tuple[int, int]:
        """The first three messages: version 0, then (our id, the shm fd)."""
        version, none = await self.receive()
        assert (version, none) == (0, None)
        my_id, none = await self.receive()
        assert none is None and 0 <= my_id < 1 << 16
        minus_one, shm_fd = await self.receive()
        assert minus_one == -1 and shm_fd is not None
        return my_id, shm_fd

    async def receive_vectors(self, vectors: int) -> tuple[int, list[int]]:
        """``vectors`` messages with one id and one eventfd each."""
        got = [await self.receive() for _ in range(vectors)]
        ids = {peer for peer, _ in got}
        assert len(ids) == 1 and all(fd is not None for _, fd in got), got
        return ids.pop(), [fd for _, fd in got if fd is not None]

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def shm_name() -> str:
    return f"aiocoloc-test-{uuid.uuid4().hex[:12]}"


Scenario = Callable[[IvshmemServer, list[FakePeer]], Awaitable[None]]


def serve(tmp_path: Path, shm_name: str, scenario: Scenario) -> None:
    """Run ``scenario`` against a server in this process (2 vectors a peer)."""

    async def main() -> None:
        server = IvshmemServer(tmp_path / "iv.sock", shm_name, SIZE, vectors=2, remove_shm=True)
        await server.start()
        peers: list[FakePeer] = []
        try:
            await scenario(server, peers)
        finally:
            for peer in peers:
                peer.close()
            server.close()

    asyncio.run(main())


def same_eventfd(a: int, b: int) -> bool:
    os.eventfd_write(a, 1)
    try:
        return os.eventfd_read(b) == 1
    except BlockingIOError:
        os.eventfd_read(a)
        return False


def test_peers_learn_of_each_other_and_of_disconnects(tmp_path: Path, shm_name: str) -> None:
    serve(tmp_path, shm_name, peers_learn_of_each_other_and_of_disconnects)


async def peers_learn_of_each_other_and_of_disconnects(
    server: IvshmemServer, peers: list[FakePeer]
) -> None:
    first = FakePeer(server.socket_path)
    peers.append(first)
    first_id, shm_fd = await first.receive_hello()
    assert os.fstat(shm_fd).st_size == SIZE
    own_id, first_vectors = await first.receive_vectors(2)
    assert own_id == first_id

    second = FakePeer(server.socket_path)
    peers.append(second)
    second_id, second_shm = await second.receive_hello()
    assert second_id != first_id
    # The new peer hears of the old one, then its own vectors.
    old_id, old_vectors = await second.receive_vectors(2)
    assert old_id == first_id
    mine, second_vectors = await second.receive_vectors(2)
    assert mine == second_id
    # The old peer hears of the new one.
    new_id, announced = await first.receive_vectors(2)
    assert new_id == second_id
    assert server.peers == sorted([first_id, second_id])

    # The same eventfds on both sides: ringing one vector wakes exactly that one.
    assert same_eventfd(announced[1], second_vectors[1])
    assert same_eventfd(old_vectors[0], first_vectors[0])
    assert not same_eventfd(announced[0], second_vectors[1])
    # One shared memory.
    with mmap.mmap(shm_fd, SIZE) as a, mmap.mmap(second_shm, SIZE) as b:
        a[100:105] = b"hello"
        assert b[100:105] == b"hello"

    second.close()
    gone, fd = await first.receive()
    assert (gone, fd) == (second_id, None)
    assert server.peers == [first_id]


def test_ids_stay_unique_as_peers_come_and_go(tmp_path: Path, shm_name: str) -> None:
    serve(tmp_path, shm_name, ids_stay_unique)


async def ids_stay_unique(server: IvshmemServer, peers: list[FakePeer]) -> None:
    seen = []
    for _ in range(3):
        peer = FakePeer(server.socket_path)
        peers.append(peer)
        peer_id, _ = await peer.receive_hello()
        seen.append(peer_id)
    assert len(set(seen)) == 3
    peers[0].close()
    late = FakePeer(server.socket_path)
    peers.append(late)
    late_id, _ = await late.receive_hello()
    assert late_id not in seen[1:]


def test_close_disconnects_peers_and_removes_the_socket(tmp_path: Path, shm_name: str) -> None:
    serve(tmp_path, shm_name, close_disconnects_peers)


async def close_disconnects_peers(server: IvshmemServer, peers: list[FakePeer]) -> None:
    peer = FakePeer(server.socket_path)
    peers.append(peer)
    await peer.receive_hello()
    await peer.receive_vectors(2)
    server.close()
    assert not os.path.exists(server.socket_path)
    assert await asyncio.to_thread(peer.sock.recv, 8) == b""
    server.close()  # idempotent


def test_refuses_a_size_that_is_not_a_power_of_two(tmp_path: Path, shm_name: str) -> None:
    with pytest.raises(ValueError, match="power of two"):
        IvshmemServer(tmp_path / "s", shm_name, 3 << 20)


def test_opens_an_existing_shm_of_the_right_size_only(tmp_path: Path, shm_name: str) -> None:
    async def main() -> None:
        wrong = IvshmemServer(tmp_path / "wrong.sock", shm_name, SIZE * 2)
        with pytest.raises(SegmentError, match="holds"):
            await wrong.start()
        async with IvshmemServer(tmp_path / "right.sock", shm_name, SIZE) as right:
            assert right.peers == []

    with PosixShmSegment.create(shm_name, SIZE):
        asyncio.run(main())


def test_refuses_a_socket_another_server_listens_on(tmp_path: Path, shm_name: str) -> None:
    async def second_server(server: IvshmemServer, peers: list[FakePeer]) -> None:
        other = IvshmemServer(server.socket_path, shm_name, SIZE)
        with pytest.raises(OSError, match="in use"):
            await other.start()

    serve(tmp_path, shm_name, second_server)


def test_command_line_serves_until_sigterm(tmp_path: Path, shm_name: str) -> None:
    path = tmp_path / "cli.sock"
    command = [sys.executable, "-m", "aiocoloc.cli.ivshmem_server", "--socket", str(path)]
    command += ["--shm", shm_name, "--size", "64K", "--remove-shm"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        peer = FakePeer(str(path))
        assert struct.unpack("<q", peer.sock.recv(8))[0] == 0  # the version: no descriptor
        peer.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()  # type: ignore[union-attr]


def test_command_line_refuses_a_bad_size(tmp_path: Path, shm_name: str) -> None:
    command = [sys.executable, "-m", "aiocoloc.cli.ivshmem_server", "--socket", str(tmp_path)]
    result = subprocess.run(
        [*command, "--shm", shm_name, "--size", "3000"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "power of two" in result.stderr
