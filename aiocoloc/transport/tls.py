"""TLS on top of a ``SwitchableTransport``, on any event loop.

asyncio's ``loop.start_tls`` wraps any transport that declares
``_start_tls_compatible``; uvloop's only wraps its own transports.  This
does what asyncio's does -- put asyncio's ``SSLProtocol`` between the
transport and the application -- on whichever loop runs, so TLS works the
same over TCP and over shared memory (where the ciphertext travels through
the pipes).
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Any

__all__ = ["let_loop_start_tls", "start_tls"]


async def start_tls(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    sslcontext: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
) -> asyncio.Transport:
    """Upgrade ``transport`` to TLS; returns the transport ``protocol`` uses from now on."""
    if not isinstance(sslcontext, ssl.SSLContext):
        raise TypeError(f"sslcontext must be an ssl.SSLContext, not {type(sslcontext).__name__}")
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.BaseEventLoop):
        new: asyncio.Transport | None = await loop.start_tls(
            transport,
            protocol,
            sslcontext,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        assert new is not None
        return new
    handshake: asyncio.Future[Any] = loop.create_future()
    tls = sslproto.SSLProtocol(
        loop,
        protocol,
        sslcontext,
        handshake,
        server_side,
        server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]  # seconds, float ok
        ssl_shutdown_timeout=ssl_shutdown_timeout,
        call_connection_made=False,
    )
    # Nothing may reach the TLS protocol before it has seen connection_made.
    transport.pause_reading()  # type: ignore[attr-defined]
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)  # type: ignore[attr-defined]
    try:
        await handshake
    except BaseException:
        made.cancel()
        resumed.cancel()
        transport.close()
        raise
    return tls._app_transport


def let_loop_start_tls(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop.start_tls`` (hence ``StreamWriter.start_tls``, STARTTLS in
    libraries) accept our transports on this loop's class.

    asyncio's loop wraps any transport that declares ``_start_tls_compatible``;
    uvloop's raises ``TypeError`` for all but its own.  Its class gets a
    ``start_tls`` that hands such transports to ``start_tls`` above and every
    other one to uvloop.  Idempotent; asyncio's loops are left alone.
    """
    klass = type(loop)
    if klass in TLS_READY_LOOPS:
        return
    TLS_READY_LOOPS.add(klass)
    if isinstance(loop, asyncio.BaseEventLoop):
        return  # asyncio's start_tls takes any transport that says it can
    own = klass.start_tls

    async def start_tls_too(
        self: asyncio.AbstractEventLoop,
        transport: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        sslcontext: ssl.SSLContext,
        **options: Any,
    ) -> asyncio.Transport | None:
        if getattr(transport, "_start_tls_compatible", False):
            return await start_tls(transport, protocol, sslcontext, **options)
        return await own(self, transport, protocol, sslcontext, **options)  # type: ignore[arg-type]

    start_tls_too.__doc__ = own.__doc__
    klass.start_tls = start_tls_too  # type: ignore[method-assign]


#: Loop classes whose start_tls accepts our transports (callers on hot
#: paths test ``type(loop) in TLS_READY_LOOPS`` before calling ``let_loop_start_tls``).
TLS_READY_LOOPS: set[type] = set()
