"""A server built with an unmodified third-party library riding on aiocoloc
(``aiocoloc.install()``), in its own process, for tests/test_libraries.py.

    python library_peer.py LOOP SERVER

LOOP is ``asyncio`` or ``uvloop``, SERVER ``aiohttp`` or ``websockets``.  It
serves on 127.0.0.1 (port 0), prints the port on a line, and runs until its
stdin closes.  It exits with status 1 if its event loop reported an error.

aiohttp routes:
    GET  /mode                  this side's ``get_extra_info("aiocoloc")`` (JSON)
    GET  /stream?size=N&seed=S  ``pattern(S, N)``, streamed in chunks of varied size
    POST /upload                reads the body; answers its size, sha256 and
                                this side's aiocoloc info (JSON)

websockets: echoes every message, except the text ``"mode?"``, answered with
this side's aiocoloc info (JSON).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve

import aiocoloc

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
#: Sizes the streamed body is cut into (cycled through at random).
CHUNK_SIZES = (1, 1000, 8192, 65536, 100_000, 262_144, 1 << 20)


def pattern(seed: int, size: int) -> bytes:
    """``size`` pseudo-random bytes that both processes can generate."""
    return random.Random(seed).randbytes(size)


def coloc_info(transport: Any) -> dict[str, Any]:
    """This side's aiocoloc state of a connection (``None`` if not aiocoloc's)."""
    info: dict[str, Any] | None = (
        transport.get_extra_info("aiocoloc") if transport is not None else None
    )
    return {"aiocoloc": info}


# --- aiohttp ---------------------------------------------------------------------------


async def mode(request: web.Request) -> web.Response:
    return web.json_response(coloc_info(request.transport))


async def stream(request: web.Request) -> web.StreamResponse:
    size, seed = int(request.query["size"]), int(request.query["seed"])
    data = memoryview(pattern(seed, size))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await response.prepare(request)
    rng = random.Random(seed)
    sent = 0
    while sent < size:
        n = rng.choice(CHUNK_SIZES)
        await response.write(data[sent : sent + n])
        sent += n
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {"size": size, "sha256": digest.hexdigest(), **coloc_info(request.transport)}
    )


async def serve_aiohttp(until_stdin_closes: Awaitable[Any]) -> None:
    app = web.Application()
    app.router.add_get("/mode", mode)
    app.router.add_get("/stream", stream)
    app.router.add_post("/upload", upload)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await until_stdin_closes
    finally:
        await runner.cleanup()


# --- websockets ------------------------------------------------------------------------


async def echo(connection: ServerConnection) -> None:
    async for message in connection:
        if message == "mode?":
            await connection.send(json.dumps(coloc_info(connection.transport)))
        else:
            await connection.send(message)


async def serve_websockets(until_stdin_closes: Awaitable[Any]) -> None:
    async with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await until_stdin_closes


# --- main ------------------------------------------------------------------------------

SERVERS: dict[str, Callable[[Awaitable[Any]], Awaitable[None]]] = {
    "aiohttp": serve_aiohttp,
    "websockets": serve_websockets,
}


async def main(server: str, errors: list[dict[str, Any]]) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    await SERVERS[server](loop.run_in_executor(None, sys.stdin.read))


if __name__ == "__main__":
    loop_kind, server_kind = sys.argv[1:3]
    aiocoloc.install()
    aiocoloc.configure(upgrade="always")
    errors: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
        runner.run(main(server_kind, errors))
    for context in errors:
        print(f"library_peer: loop error: {context}", file=sys.stderr)
    sys.exit(1 if errors else 0)
