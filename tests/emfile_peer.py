"""A server process of tests/test_upgrade_failures.py that runs out of
descriptors on command.

emfile_peer.py    aiocoloc.start_server echo with RLIMIT_NOFILE at 256; logs
                  aiocoloc's records to stderr, prints its port, then obeys
                  stdin: "fill" takes every descriptor left (prints "full"),
                  "free" gives them back (prints "freed"); EOF stops it
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys

import aiocoloc


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await aiocoloc.start_server(echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    held: list[int] = []
    async with server:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "fill":
                try:
                    while True:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    pass
                print("full", flush=True)
            elif line.strip() == "free":
                for fd in held:
                    os.close(fd)
                held.clear()
                print("freed", flush=True)


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
    asyncio.run(main())
