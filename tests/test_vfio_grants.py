"""Granting a guest's ivshmem doorbell device to its processes
(``aiocoloc.notify.vfio_grants``) and ringing through a grant
(``aiocoloc.notify.vfio_bells``), on the host: the "device" is a memfd laid
out as the VFIO device file is (BAR0 registers, BAR2 memory at their region
offsets) with an eventfd per vector.  The real device: tests/test_qemu_vms.py."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aiocoloc.notify import vfio_bells
from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.notify.vfio_grants import GrantServer, grants_path, request_grant

BAR0, BAR2 = (0, 256), (4096, 8192)


@dataclass
class FakeDevice:
    address: str = "0000:00:09.0"
    position: int = 3
    closed: bool = False
    fd: int = field(default_factory=lambda: os.memfd_create("fake-vfio-device"))
    eventfds: list[int] = field(default_factory=lambda: [new_eventfd(), new_eventfd()])

    def __post_init__(self) -> None:
        os.ftruncate(self.fd, BAR2[0] + BAR2[1])

    @property
    def vectors(self) -> int:
        return len(self.eventfds)

    def regions(self) -> tuple[int, int, int, int]:
        return (*BAR0, *BAR2)

    def dup_device(self) -> int:
        return os.dup(self.fd)

    def listen_fd(self, vector: int = 0) -> int:
        return self.eventfds[vector]

    def register(self, index: int) -> int:
        value: int = struct.unpack_from("<I", os.pread(self.fd, 4, index * 4))[0]
        return value

    def close(self) -> None:
        for fd in (self.fd, *self.eventfds):
            os.close(fd)


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    fake = FakeDevice()
    yield fake
    fake.close()


def run(scenario: object) -> None:
    asyncio.run(asyncio.wait_for(scenario, 20))  # type: ignore[arg-type]


def test_grants_one_vector_each_until_none_is_left_and_a_closed_lease_frees_it(
    tmp_path: Path, device: FakeDevice
) -> None:
    path = grants_path(tmp_path / "api.sock")
    assert path == tmp_path / "api.sock.bells"

    async def scenario() -> None:
        server = GrantServer(path, lambda pool: device if pool == "p1" else None)
        server.start()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        loop = asyncio.get_running_loop()
        try:
            first = await loop.run_in_executor(None, request_grant, path, "p1")
            second = await loop.run_in_executor(None, request_grant, path, "p1")
            assert first is not None and second is not None
            assert (first.vector, second.vector) == (0, 1)
            assert (first.position, first.address) == (3, device.address)
            assert (first.bar0, first.bar2) == (BAR0, BAR2)
            assert server.granted(device.address) == {0, 1}
            assert await loop.run_in_executor(None, request_grant, path, "p1") is None  # all taken
            assert await loop.run_in_executor(None, request_grant, path, "nope") is None
            first.close()  # the lease ends: vector 0 is free again
            for _ in range(100):
                if server.granted(device.address) == {1}:
                    break
                await asyncio.sleep(0.01)
            assert server.granted(device.address) == {1}
            third = await loop.run_in_executor(None, request_grant, path, "p1")
            assert third is not None and third.vector == 0
            third.close()
            second.close()
        finally:
            await server.close()
        assert not path.exists()

    run(scenario())


def test_bad_requests_get_an_error_and_no_descriptors(tmp_path: Path, device: FakeDevice) -> None:
    path = grants_path(tmp_path / "api.sock")

    async def scenario() -> None:
        server = GrantServer(path, lambda pool: device)
        server.start()
        loop = asyncio.get_running_loop()

        def ask(raw: bytes) -> tuple[object, list[int]]:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(raw)
                data, fds, _, _ = socket.recv_fds(sock, 1024, 2)
                for fd in fds:
                    os.close(fd)
                return (json.loads(data) if data else None), fds

        try:
            reply, fds = await loop.run_in_executor(None, ask, b'{"op": "steal"}\n')
            assert fds == [] and isinstance(reply, dict) and not reply["ok"]
            reply, fds = await loop.run_in_executor(None, ask, b"garbage\n")
            assert fds == [] and reply is None  # dropped
            assert server.granted(device.address) == frozenset()
        finally:
            await server.close()

    run(scenario())


def test_rings_write_the_doorbell_register_and_an_interrupt_wakes_ready_connections(
    tmp_path: Path, device: FakeDevice
) -> None:
    path = grants_path(tmp_path / "api.sock")

    async def scenario() -> None:
        server = GrantServer(path, lambda pool: device)
        server.start()
        loop = asyncio.get_running_loop()
        grant = await loop.run_in_executor(None, request_grant, path, "p1")
        assert grant is not None
        bells = vfio_bells.VfioBells(grant)
        try:
            assert bells.position == (3, 0)
            doorbell = bells.doorbell((5, 1))
            doorbell.ring()
            assert device.register(3) == (5 << 16) | 1  # BAR0 offset 12
            # The pool's memory through the grant is the device's BAR2.
            segment = bells.segment()
            region = segment.map()
            region[:5] = b"hello"
            assert os.pread(device.fd, 5, BAR2[0]) == b"hello"
            region.close()
            segment.close()
            # An interrupt on our vector wakes the connections that may be rung.
            woken: list[str] = []
            ready = {"a": True, "b": False}
            for name in ("a", "b"):
                bell = bells.doorbell((5, 1))
                bell.listen(loop, lambda n=name: woken.append(n), lambda n=name: ready[n])
            os.eventfd_write(device.listen_fd(0), 1)
            for _ in range(100):
                if woken:
                    break
                await asyncio.sleep(0.01)
            assert woken == ["a"] and bells.interrupts == 1
            doorbell.close()
        finally:
            bells.close()
            await server.close()
        assert bells.closed and grant.device_fd == -1

    run(scenario())


def test_the_first_grant_for_a_pool_is_kept(tmp_path: Path, device: FakeDevice) -> None:
    path = grants_path(tmp_path / "api.sock")

    async def scenario() -> None:
        server = GrantServer(path, lambda pool: device)
        server.start()
        loop = asyncio.get_running_loop()
        try:
            one = await loop.run_in_executor(None, request_grant, path, "pool-x")
            two = await loop.run_in_executor(None, request_grant, path, "pool-x")
            assert one is not None and two is not None
            kept = vfio_bells.register("pool-x", vfio_bells.VfioBells(one))
            again = vfio_bells.register("pool-x", vfio_bells.VfioBells(two))
            assert again is kept and vfio_bells.bells_for("pool-x") is kept
            kept.close()
            assert vfio_bells.bells_for("pool-x") is None
        finally:
            await server.close()

    run(scenario())


def test_no_grant_socket_means_no_grant(tmp_path: Path) -> None:
    assert request_grant(tmp_path / "none.bells", "p") is None
    assert mmap.PAGESIZE <= BAR2[0]  # (the fake's layout keeps BAR2 page-aligned)
