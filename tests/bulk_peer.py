"""The other process of tests/test_bulk_upgrade.py: the reading end of a
bulk transfer, with the default upgrade policy.

bulk_peer.py server <loop>         aiocoloc.start_server; prints its port,
                                   then for each connection, once the client
                                   has written EOF, one JSON line
                                   {"sha256", "bytes", "mode"}
bulk_peer.py client <loop> <port>  aiocoloc.open_connection; reads to EOF
                                   and prints the same JSON line
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

import uvloop

import aiocoloc


async def drink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    digest, total = hashlib.sha256(), 0
    while data := await reader.read(1 << 20):
        digest.update(data)
        total += len(data)
    mode = writer.transport.get_extra_info("aiocoloc")["rx_mode"]
    print(json.dumps({"sha256": digest.hexdigest(), "bytes": total, "mode": mode}), flush=True)
    writer.close()


async def server() -> None:
    srv = await aiocoloc.start_server(drink, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    async with srv:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def client(port: int) -> None:
    reader, writer = await aiocoloc.open_connection("127.0.0.1", port)
    await drink(reader, writer)


if __name__ == "__main__":
    role, loop_kind = sys.argv[1], sys.argv[2]
    main = server() if role == "server" else client(int(sys.argv[3]))
    if loop_kind == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)
