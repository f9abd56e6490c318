"""Sharing one guest's ivshmem doorbell device among its processes.

Opening an ivshmem device through VFIO takes it from the whole guest: no
other process can map its BAR2 through sysfs any more (``EINVAL``), and a
mapping made before faults.  So one process owns it -- the discovery
sidecar, run with ``--doorbells vfio`` -- and *grants* it to the others on
a Unix socket beside its API (``<api>.bells``, owner-only):

    request  a JSON line {"op": "grant", "pool": "<pool id>"}
    reply    a JSON line {"ok": true, "address": "<PCI address>",
                          "position": IVPosition, "vector": v,
                          "bar0": [offset, size], "bar2": [offset, size]}
             with SCM_RIGHTS [a dup of the VFIO device, vector v's eventfd]
          or {"ok": false, "error": "..."} and no descriptors

With the device descriptor a process maps the pool (BAR2) and the doorbell
register (BAR0) itself; vector ``v``'s interrupts are its own (each process
its own vector: an eventfd read by two processes would wake only one).  The
connection is the grant's lease: when it closes, the vector is free again.
A process that gets no grant uses the sysfs mapping and message doorbells.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Device(Protocol):
    """What a grant needs of a device (``aiocoloc.notify.vfio.IvshmemVfio``)."""

    address: str

    @property
    def closed(self) -> bool: ...
    @property
    def position(self) -> int: ...
    @property
    def vectors(self) -> int: ...
    def regions(self) -> tuple[int, int, int, int]: ...
    def dup_device(self) -> int: ...
    def listen_fd(self, vector: int = 0) -> int: ...


__all__ = [
    "GRANT_SUFFIX",
    "Device",
    "Grant",
    "GrantServer",
    "grants_path",
    "request_grant",
]

_log = logging.getLogger("aiocoloc.notify.vfio_grants")

GRANT_SUFFIX = ".bells"
_MAX_LINE = 1024


def grants_path(api: str | os.PathLike[str]) -> Path:
    """The grant socket beside the sidecar's API socket ``api``."""
    return Path(f"{os.fspath(api)}{GRANT_SUFFIX}")


@dataclass
class Grant:
    """A process's share of the device (its descriptors owned: ``close()``)."""

    address: str
    position: int
    vector: int
    bar0: tuple[int, int]  # (offset, size) in ``device_fd``
    bar2: tuple[int, int]
    device_fd: int
    eventfd: int
    lease: socket.socket  # closing it gives the vector back

    def close(self) -> None:
        for fd in (self.device_fd, self.eventfd):
            if fd >= 0:
                os.close(fd)
        self.device_fd = self.eventfd = -1
        self.lease.close()


def _pair(value: Any) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ValueError(f"not an (offset, size) pair: {value!r}")
    return value[0], value[1]


def request_grant(path: str | os.PathLike[str], pool_id: str, timeout: float = 2.0) -> Grant | None:
    """Ask the grant socket at ``path`` for the device of pool ``pool_id``;
    None (logged at DEBUG) when there is no grant to be had.  Blocking."""
    if not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(json.dumps({"op": "grant", "pool": pool_id}).encode() + b"\n")
        data, fds, _, _ = socket.recv_fds(sock, _MAX_LINE, 2)
        reply = json.loads(data)
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            _log.debug("no doorbell grant for pool %s: %s", pool_id, error)
            raise LookupError(error)
        if len(fds) != 2:
            raise ValueError(f"a grant came with {len(fds)} descriptors, not 2")
        grant = Grant(
            str(reply["address"]),
            int(reply["position"]),
            int(reply["vector"]),
            _pair(reply["bar0"]),
            _pair(reply["bar2"]),
            fds[0],
            fds[1],
            sock,
        )
        sock.settimeout(None)
        return grant
    except (OSError, ValueError, KeyError, TypeError, LookupError) as exc:
        _log.debug("doorbell grant for pool %s from %s failed: %s", pool_id, path, exc)
        for fd in fds:
            os.close(fd)
        sock.close()
        return None


class GrantServer:
    """The sidecar's side: grants the devices ``devices(pool_id)`` finds,
    one MSI-X vector per live grant."""

    def __init__(self, path: Path, devices: Callable[[str], Device | None]) -> None:
        self.path = path
        self._devices = devices
        self._taken: dict[str, set[int]] = {}  # PCI address -> vectors granted
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Listen (owner-only); a stale socket file is replaced."""
        loop = asyncio.get_running_loop()
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        loop.add_reader(listener.fileno(), self._accept)
        _log.info("granting doorbell devices on %s", self.path)

    def granted(self, address: str) -> frozenset[int]:
        """The vectors of device ``address`` held now."""
        return frozenset(self._taken.get(address, ()))

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log.warning("grant socket cannot accept: %s", exc)
                return
            task = asyncio.get_running_loop().create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        held: tuple[str, int] | None = None
        try:
            request = await asyncio.wait_for(self._read_line(loop, sock), 5.0)
            reply, fds, held = self._grant(request)
            try:  # under 1 KiB into a fresh socket: never blocks
                _send(sock, reply, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if held is not None:
                while await loop.sock_recv(sock, 64):  # the lease: until the holder goes
                    pass
        except (OSError, TimeoutError, ValueError) as exc:
            _log.debug("grant connection ended: %s", exc)
        finally:
            if held is not None:
                self._taken[held[0]].discard(held[1])
                _log.debug("vector %d of %s is free again", held[1], held[0])
            sock.close()

    @staticmethod
    async def _read_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Any:
        data = b""
        while not data.endswith(b"\n"):
            chunk = await loop.sock_recv(sock, _MAX_LINE)
            if not chunk or len(data) + len(chunk) > _MAX_LINE:
                raise ValueError("no request line")
            data += chunk
        return json.loads(data)

    def _grant(self, request: Any) -> tuple[dict[str, Any], list[int], tuple[str, int] | None]:
        if not isinstance(request, dict) or request.get("op") != "grant":
            return {"ok": False, "error": "expected {'op': 'grant', 'pool': ...}"}, [], None
        pool = request.get("pool")
        device = self._devices(pool) if isinstance(pool, str) else None
        if device is None or device.closed:
            return {"ok": False, "error": f"no doorbell device for pool {pool!r}"}, [], None
        taken = self._taken.setdefault(device.address, set())
        free = [v for v in range(device.vectors) if v not in taken]
        if not free:
            error = f"all {device.vectors} vectors of {device.address} are granted"
            return {"ok": False, "error": error}, [], None
        vector = free[0]
        bar0_offset, bar0_size, bar2_offset, bar2_size = device.regions()
        fds = [device.dup_device(), os.dup(device.listen_fd(vector))]
        taken.add(vector)
        reply = {
            "ok": True,
            "address": device.address,
            "position": device.position,
            "vector": vector,
            "bar0": [bar0_offset, bar0_size],
            "bar2": [bar2_offset, bar2_size],
        }
        return reply, fds, (device.address, vector)

    async def close(self) -> None:
        """Stop granting; live grants end (their holders keep what they mapped)."""
        if self._listener is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))


def _send(sock: socket.socket, reply: dict[str, Any], fds: list[int]) -> None:
    line = json.dumps(reply).encode() + b"\n"
    if fds:
        sock.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(line)
