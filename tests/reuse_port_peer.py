"""A server process of tests/test_reuse_port.py.

reuse_port_peer.py <loop> <port>   aiocoloc.start_server echo on 127.0.0.1:<port>
                                   with reuse_port (0: pick one); prints the port,
                                   then its pid once per connection whose data
                                   came on shared memory (upgraded both ways);
                                   serves until its stdin closes
reuse_port_peer.py <loop> fd=<n>   the same on the listening socket <n> it
                                   inherited (as uvicorn's workers share one)
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import uvloop

import aiocoloc


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    reported = False
    try:
        while data := await reader.read(1 << 16):
            info = writer.transport.get_extra_info("aiocoloc")
            if not reported and info["mode"] == "shm" and info["rx_mode"] == "shm":
                print(os.getpid(), flush=True)
                reported = True
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(where: str) -> None:
    if where.startswith("fd="):
        sock = socket.socket(fileno=int(where[3:]))
        server = await aiocoloc.start_server(echo, sock=sock, upgrade="always")
    else:
        server = await aiocoloc.start_server(
            echo, "127.0.0.1", int(where), reuse_port=True, upgrade="always"
        )
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    loop_kind, where = sys.argv[1], sys.argv[2]
    if loop_kind == "uvloop":
        uvloop.run(serve(where))
    else:
        asyncio.run(serve(where))
