"""The server process of ``bench/streams.py`` (run as ``bench/streams.py
--serve KIND``), what it answers, and how the bench starts and stops one.

A stream cell's server (``tcp``, ``uds``, ``shm``) serves one connection
and ends with it; the connection's first 9 bytes say what follows: ``S`` +
8 bytes (bulk: the server counts bytes until EOF and replies with the
count), ``I`` (idle until EOF) or anything else + a size (echo messages of
that size until EOF).  The connection cells' servers (``conn-plain``,
``conn-coloc``) answer REQUEST-byte requests on any number of connections,
until their stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import aiocoloc
from bench import _processes as processes
from bench._processes import LOOPS

__all__ = ["LOOPS", "REPLY", "REQUEST", "serve", "spawn", "stop"]

#: The script a server process runs (with ``--serve``).
SCRIPT = Path(__file__).with_name("streams.py")
#: Connection cells: request size; the reply to b"E..." is the request itself,
#: to b"K..." this many bytes.
REQUEST = 64
REPLY = 1024


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream cell's connection: its 9-byte header says what to do."""
    try:
        try:
            header = await reader.readexactly(9)
        except asyncio.IncompleteReadError:
            return  # the client gave up before it began (it did not upgrade)
        kind, size = header[:1], int.from_bytes(header[1:], "big")
        if kind == b"S":  # bulk: count until EOF, report
            n = 0
            while chunk := await reader.read(1 << 20):
                n += len(chunk)
            writer.write(n.to_bytes(8, "big"))
            await writer.drain()
        elif kind == b"I":  # idle: wait for EOF
            await reader.read()
        else:  # echo fixed-size messages until EOF
            while True:
                try:
                    message = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    break
                writer.write(message)
                await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Connection cells: answer each request (echo, or REPLY bytes) until EOF."""
    reply = bytes(REPLY)
    try:
        while True:
            try:
                request = await reader.readexactly(REQUEST)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(request if request[:1] == b"E" else reply)
            await writer.drain()
    finally:
        writer.close()


async def serve(kind: str, args: list[str]) -> None:
    """Serve ``kind``, its port (or socket path) printed as the first line."""
    loop = asyncio.get_running_loop()
    if kind in ("conn-plain", "conn-coloc"):  # many connections, until stdin closes
        start = asyncio.start_server if kind == "conn-plain" else aiocoloc.start_server
        server = await start(answer, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await loop.run_in_executor(None, sys.stdin.read)
        return

    done = loop.create_future()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        finally:
            if not done.done():
                done.set_result(None)

    if kind == "tcp":
        server = await asyncio.start_server(one, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
    elif kind == "uds":
        server = await asyncio.start_unix_server(one, args[0])
        print(args[0], flush=True)
    else:
        server = await aiocoloc.start_server(one, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await done


def spawn(kind: str, loop_name: str, args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A server process of ``kind``; returns it and the first line it prints."""
    return processes.spawn(SCRIPT, ["--serve", kind, "--loop", loop_name, *args])


def stop(child: subprocess.Popen[str]) -> None:
    """Close the server's stdin and reap it (killed if it takes 10 s)."""
    processes.stop(child, timeout=10.0)
