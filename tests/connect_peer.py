"""The other process of tests/test_connect_processes.py.

connect_peer.py server <loop> [nohub]  aiocoloc.start_server echo (on $PEER_HOST,
                                     else 127.0.0.1); prints its
                                     port, then one JSON line per connection
                                     once both its directions are on shm
                                     (nohub: plays a server from before hubs)
connect_peer.py client <loop> <port> aiocoloc.open_connection, echoes what
                                     it reads; prints {"upgraded": true}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop

import aiocoloc
from aiocoloc.notify import hub


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def report() -> None:
        while True:
            info = writer.transport.get_extra_info("aiocoloc")
            if info["mode"] == "shm" and info["rx_mode"] == "shm":
                print(json.dumps({"upgraded": True}), flush=True)
                return
            await asyncio.sleep(0.005)

    reporter = asyncio.get_running_loop().create_task(report())
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        reporter.cancel()
        writer.close()


async def server() -> None:
    host = os.environ.get("PEER_HOST", "127.0.0.1")
    srv = await aiocoloc.start_server(echo, host, 0, upgrade="always")
    print(srv.sockets[0].getsockname()[1], flush=True)
    async with srv:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def client(port: int) -> None:
    reader, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
    await echo(reader, writer)


if __name__ == "__main__":
    role, loop_kind = sys.argv[1], sys.argv[2]
    if sys.argv[3:] == ["nohub"]:
        hub.OFFER = False
    main = server() if role == "server" else client(int(sys.argv[3]))
    if loop_kind == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)
