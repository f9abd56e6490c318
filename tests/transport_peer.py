"""The far end of a shared-memory connection, in its own process.

Receives its descriptors from the parent (pass_fds): the accepted TCP socket,
its end of the control socket, the pool's memfd, the eventfd it listens on
and the one it rings.  Joins the pool, reports its member slot, reads the two
pipe handles from stdin, then plays a role:

    echo   write back everything it receives
    echo-switching  the same, moving its sending path every 100 kB
    stall  never read (the parent's writes pile up)
    idle   do nothing
    sink   read and count; report the count at EOF

Then it waits on stdin for ``die-tcp-first``: its TCP connection is reset, and
30 ms later the process is killed (its pipe ends still open), so that the
parent sees the TCP loss well before the control socket closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import sys
import time

from aiocoloc.shm import MemfdSegment, PipeHandle, Pool
from aiocoloc.transport import attach_shared_memory, open_transport


class Role(asyncio.Protocol):
    def __init__(self, role: str) -> None:
        self.role = role
        self.count = 0
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.role == "stall":
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        if self.role in ("echo", "echo-switching"):
            assert self.transport is not None
            self.transport.write(data)
        if (
            self.role == "echo-switching"
            and self.count // 100_000 != (self.count - len(data)) // 100_000
        ):
            transport = self.transport
            transport.switch_tx("tcp" if transport.mode == "shm" else "shm")  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        print(json.dumps({"received": self.count}), flush=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)


async def main(
    role: str, tcp_fd: int, ctrl_fd: int, memfd: int, listen_fd: int, ring_fd: int
) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool.attach(MemfdSegment.from_fd(memfd))
    print(json.dumps({"slot": pool.slot}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    up_slot, up_gen, down_slot, down_gen = map(int, line.split())
    transport, protocol = await open_transport(
        loop, lambda: Role(role), socket.socket(fileno=tcp_fd)
    )
    attach_shared_memory(
        transport,
        pool,
        send=PipeHandle(down_slot, down_gen),
        receive=PipeHandle(up_slot, up_gen),
        listen_fd=listen_fd,
        ring_fd=ring_fd,
        control=socket.socket(fileno=ctrl_fd),
    )
    transport.switch_tx("shm")
    print(json.dumps({"ready": True}), flush=True)
    command = loop.run_in_executor(None, sys.stdin.readline)
    await asyncio.wait([protocol.done, command], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[attr-defined]
    if command.done() and command.result().strip() == "die-tcp-first":
        reset = socket.socket(fileno=os.dup(tcp_fd))  # closed last, with linger 0: RST
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(tcp_fd)
        reset.close()
        time.sleep(0.03)
        os.kill(os.getpid(), signal.SIGKILL)
    pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], *map(int, sys.argv[2:7])))
