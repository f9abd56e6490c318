"""An ivshmem server: the peer directory behind QEMU ``ivshmem-doorbell`` devices.

    python -m aiocoloc.cli.ivshmem_server --socket PATH --shm NAME --size BYTES [--vectors N]

Each QEMU started with ``-chardev socket,path=PATH,id=ivs -device
ivshmem-doorbell,chardev=ivs,vectors=N`` connects to the server's Unix socket
and gets, by QEMU's ivshmem client-server protocol (version 0; every message
is a little-endian int64, some carry one descriptor by SCM_RIGHTS):

1. the protocol version (0), then its own peer id, then ``-1`` with the
   shared memory (the POSIX shm ``NAME``, created with ``BYTES`` or opened);
2. for every peer already connected, that peer's id once per vector, each
   with the eventfd that interrupts that vector of that peer;
3. its own id once per vector with its own eventfds (the server creates them).

Peers already connected get the newcomer's id and eventfds the same way; when a
peer disconnects, every other peer gets its id without a descriptor.  Peer ids
are 16 bits (the doorbell register holds ``peer << 16 | vector``).

Exit status: 0 after SIGTERM/SIGINT (the socket is removed), 1 when the socket
or the shared memory cannot be set up, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiocoloc.errors import SegmentError
from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.shm.segments.base import is_power_of_two
from aiocoloc.shm.segments.posix import PosixShmSegment, UnlinkPolicy

__all__ = ["PROTOCOL_VERSION", "IvshmemServer", "main"]

_log = logging.getLogger("aiocoloc.cli.ivshmem_server")

#: The only version of QEMU's ivshmem client-server protocol.
PROTOCOL_VERSION = 0
#: Peer ids fit in the upper half of the 32-bit doorbell register.
MAX_PEERS = 1 << 16
#: QEMU refuses more vectors than this on one device.
MAX_VECTORS = 1024
_MESSAGE = struct.Struct("<q")  # every message: one little-endian int64
_SHM_MESSAGE = -1  # the value that carries the shared memory descriptor


@dataclass
class _Peer:
    id: int
    sock: socket.socket
    eventfds: list[int] = field(default_factory=list)


class IvshmemServer:
    """Serve ivshmem peers on ``socket_path`` with POSIX shm ``shm_name`` of
    ``size`` bytes (a power of two) and ``vectors`` interrupts per peer.

    ``remove_shm``: remove the shm name on close if this server created it.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        shm_name: str,
        size: int,
        vectors: int = 1,
        *,
        remove_shm: bool = False,
    ) -> None:
        if not is_power_of_two(size):
            raise ValueError(f"shared memory size {size} is not a power of two (QEMU needs one)")
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"vectors must be between 1 and {MAX_VECTORS}, got {vectors}")
        self.socket_path = os.fspath(socket_path)
        self.shm_name = shm_name
        self.size = size
        self.vectors = vectors
        self._remove_shm = remove_shm
        self._shm: PosixShmSegment | None = None
        self._listener: socket.socket | None = None
        self._socket_inode = 0
        self._peers: dict[int, _Peer] = {}
        self._next_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = asyncio.Event()

    @property
    def peers(self) -> list[int]:
        """The ids of the connected peers."""
        return sorted(self._peers)

    async def start(self) -> None:
        """Open the shared memory and listen (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._shm = self._open_shm()
        try:
            self._listener = self._listen()
        except BaseException:
            self._shm.close()
            raise
        self._loop.add_reader(self._listener.fileno(), self._accept)
        _log.info(
            "serving %s on %s (%d bytes, %d vectors)",
            self._shm.name,
            self.socket_path,
            self.size,
            self.vectors,
        )

    async def serve_forever(self) -> None:
        """Start if needed and serve until ``close()``."""
        if self._listener is None:
            await self.start()
        await self._closed.wait()

    def close(self) -> None:
        """Disconnect every peer, stop listening, remove the socket.  Idempotent."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                # Only our own socket: another server may have taken the path since.
                if os.stat(self.socket_path).st_ino == self._socket_inode:
                    os.unlink(self.socket_path)
        for peer in list(self._peers.values()):
            self._forget(peer)
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self._closed.set()

    async def __aenter__(self) -> IvshmemServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _open_shm(self) -> PosixShmSegment:
        unlink = UnlinkPolicy.ON_CLOSE if self._remove_shm else UnlinkPolicy.NEVER
        try:
            return PosixShmSegment.create(self.shm_name, self.size, unlink=unlink)
        except SegmentError:
            pass  # it exists (or cannot be created): open it as it is
        shm = PosixShmSegment.attach(self.shm_name)
        if shm.size != self.size:
            shm.close()
            raise SegmentError(f"shared memory {shm.name} holds {shm.size} bytes, not {self.size}")
        return shm

    def _listen(self) -> socket.socket:
        if os.path.exists(self.socket_path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.socket_path)
                except OSError:
                    os.unlink(self.socket_path)  # stale: nobody listens there
                else:
                    raise OSError(f"{self.socket_path} is in use by another server")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
            listener.listen(64)
            listener.setblocking(False)
            self._socket_inode = os.stat(self.socket_path).st_ino
        except BaseException:
            listener.close()
            raise
        return listener

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the peers we have
                _log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            peer_id = self._free_id()
            if peer_id is None:
                _log.warning("refusing a peer: all %d ids are in use", MAX_PEERS)
                sock.close()
                continue
            self._admit(_Peer(peer_id, sock))

    def _free_id(self) -> int | None:
        for _ in range(MAX_PEERS):
            candidate, self._next_id = self._next_id, (self._next_id + 1) % MAX_PEERS
            if candidate not in self._peers:
                return candidate
        return None

    def _admit(self, new: _Peer) -> None:
        assert self._shm is not None and self._loop is not None
        new.eventfds = [new_eventfd() for _ in range(self.vectors)]
        self._peers[new.id] = new
        self._loop.add_reader(new.sock.fileno(), self._on_readable, new)
        hello = self._send(new, PROTOCOL_VERSION) and self._send(new, new.id)
        if not (hello and self._send(new, _SHM_MESSAGE, self._shm.fd)):
            self._drop(new)
            return
        _log.info("peer %d connected", new.id)
        failed = []
        for old in list(self._peers.values()):
            if old is new:
                continue
            if not all(self._send(old, new.id, fd) for fd in new.eventfds):
                failed.append(old)
            if not all(self._send(new, old.id, fd) for fd in old.eventfds):
                failed.append(new)
        # Own vectors last: QEMU takes its own id's descriptors as its interrupts.
        if not all(self._send(new, new.id, fd) for fd in new.eventfds):
            failed.append(new)
        for peer in failed:
            self._drop(peer)

    def _send(self, peer: _Peer, value: int, fd: int | None = None) -> bool:
        """One message; False if the peer is gone or does not read (then drop it)."""
        data = _MESSAGE.pack(value)
        try:
            sent = peer.sock.send(data) if fd is None else socket.send_fds(peer.sock, [data], [fd])
        except OSError as exc:  # BlockingIOError included: a peer that never reads
            _log.warning("peer %d: cannot send: %s", peer.id, exc)
            return False
        return sent == len(data)

    def _on_readable(self, peer: _Peer) -> None:
        # QEMU never sends anything: readable means closed (or garbage, ignored).
        try:
            if peer.sock.recv(4096):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        """Disconnect ``peer`` and tell every other peer."""
        if self._peers.get(peer.id) is not peer:
            return
        self._forget(peer)
        _log.info("peer %d disconnected", peer.id)
        for other in list(self._peers.values()):
            if not self._send(other, peer.id):
                self._drop(other)

    def _forget(self, peer: _Peer) -> None:
        assert self._loop is not None
        del self._peers[peer.id]
        self._loop.remove_reader(peer.sock.fileno())
        peer.sock.close()
        for fd in peer.eventfds:
            os.close(fd)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K/M/G)") from None
    if not is_power_of_two(value):
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be a power of two")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m aiocoloc.cli.ivshmem_server",
        description="Serve QEMU ivshmem-doorbell peers (ivshmem protocol version 0).",
    )
    parser.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    parser.add_argument("--shm", required=True, metavar="NAME", help="POSIX shared memory name")
    parser.add_argument(
        "--size", required=True, type=_size, help="shared memory bytes (power of two)"
    )
    parser.add_argument("--vectors", type=int, default=1, help="interrupt vectors per peer")
    parser.add_argument(
        "--remove-shm", action="store_true", help="remove the shm name on exit if created here"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every peer")
    return parser


async def _serve(server: IvshmemServer) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.close)
    try:
        await server.serve_forever()
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="ivshmem-server: %(message)s",
    )
    try:
        server = IvshmemServer(
            args.socket, args.shm, args.size, args.vectors, remove_shm=args.remove_shm
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(_serve(server))
    except (OSError, SegmentError) as exc:
        print(f"ivshmem-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
