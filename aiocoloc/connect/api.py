"""The connection API: asyncio's entry points, upgraded to shared memory when
the peer is a co-located aiocoloc endpoint, plain TCP otherwise.

Every connection starts as the TCP connection the loop makes (so every
keyword of ``loop.create_connection``/``create_server`` keeps working,
``sock=`` included) wrapped in a ``SwitchableTransport``.  The client then
looks its peer up (``aiocoloc.connect.registry``), runs the handshake on the
server's control socket (``aiocoloc.connect.handshake``) and switches each direction
to the pipes.  Data flows on TCP meanwhile; any failure leaves the
connection on TCP with a reason (``aiocoloc.transport.fallback``).

TLS (``ssl=``) is put on top of the switchable transport, so over shared
memory the pipes carry the TLS records, exactly as the socket would.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl as ssl_module
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from aiocoloc.connect import sidecar
from aiocoloc.connect.cluster_auth import cluster_auth
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.endpoint import ControlEndpoint
from aiocoloc.connect.handshake import ConnKey, connection_key
from aiocoloc.connect.install import original
from aiocoloc.connect.policy import (
    UPGRADE_WATCH,
    Settings,
    Trust,
    Upgrade,
    current,
    parse_trust,
    parse_upgrade,
)
from aiocoloc.connect.registry import Record, Registry
from aiocoloc.connect.rendezvous import agree
from aiocoloc.connect.rendezvous import describe as _describe
from aiocoloc.connect.server import Server
from aiocoloc.errors import HandshakeFailed, PoolError, RegistryError, SegmentError
from aiocoloc.transport import SwitchableTransport, TcpAdapter, fallback
from aiocoloc.transport.tls import TLS_READY_LOOPS, let_loop_start_tls

__all__ = ["Server", "create_connection", "create_server", "open_connection", "start_server"]

_log = logging.getLogger("aiocoloc.connect")
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# --- choosing the options ------------------------------------------------------------


def _options(upgrade: Any, trust: Any) -> tuple[Settings, Upgrade, Trust]:
    settings = current()
    return (
        settings,
        parse_upgrade(upgrade) if upgrade is not None else settings.upgrade,
        parse_trust(trust) if trust is not None else settings.trust,
    )


def _check_ssl_options(
    ssl: Any, server_hostname: Any, ssl_handshake_timeout: Any, ssl_shutdown_timeout: Any
) -> None:
    """The argument checks asyncio makes, with its messages."""
    if server_hostname is not None and not ssl:
        raise ValueError("server_hostname is only meaningful with ssl")
    if ssl_handshake_timeout is not None and not ssl:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if ssl_shutdown_timeout is not None and not ssl:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")


def _client_context(ssl: Any, server_hostname: str | None) -> ssl_module.SSLContext:
    if isinstance(ssl, ssl_module.SSLContext):
        return ssl
    context = ssl_module.create_default_context()
    if not server_hostname:
        context.check_hostname = False
    return context


# --- client side -----------------------------------------------------------------------


async def create_connection(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: ProtocolFactory,
    host: str | None = None,
    port: int | None = None,
    *,
    ssl: Any = None,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    upgrade: str | int | Upgrade | None = None,
    trust: str | Trust | None = None,
    **kwargs: Any,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """``loop.create_connection`` with every keyword it takes, upgraded to
    shared memory when the peer is co-located.  ``upgrade``/``trust``
    override the process-wide policy (``aiocoloc.connect.policy``) for this call."""
    _check_ssl_options(ssl, server_hostname, ssl_handshake_timeout, ssl_shutdown_timeout)
    if ssl and server_hostname is None:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        server_hostname = host
    settings, mode, trusted = _options(upgrade, trust)
    if type(loop) not in TLS_READY_LOOPS:  # STARTTLS on our transports, on uvloop too
        let_loop_start_tls(loop)
    protocol = protocol_factory()
    waiter: asyncio.Future[None] | None = None
    inner: asyncio.BaseProtocol = protocol
    if ssl:
        waiter = loop.create_future()
        inner = sslproto.SSLProtocol(
            loop,
            protocol,
            _client_context(ssl, server_hostname),
            waiter,
            server_side=False,
            server_hostname=server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
    adapter = TcpAdapter(lambda: inner, loop=loop)
    await original(loop, "create_connection")(lambda: adapter, host, port, **kwargs)
    transport = adapter.transport
    assert transport is not None
    _begin_upgrade(transport, mode, trusted, settings)
    if waiter is None:
        return transport, protocol
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return inner._app_transport, protocol  # type: ignore[attr-defined]


_upgrades: set[asyncio.Task[None]] = set()


def _begin_upgrade(
    transport: SwitchableTransport, mode: Upgrade, trust: Trust, settings: Settings
) -> None:
    if mode.never:
        where = _describe(transport.get_extra_info("peername"))
        fallback.record(transport, fallback.DISABLED, "upgrade policy is 'never'", where=where)
        return

    def start() -> None:
        if transport.is_closing():
            return
        where = _describe(transport.get_extra_info("peername"))
        task = asyncio.get_running_loop().create_task(
            _upgrade_client(transport, trust, settings, where)
        )
        _upgrades.add(task)
        task.add_done_callback(_upgrades.discard)
        task.add_done_callback(lambda _: transport.watch_loop(None))
        transport.add_close_callback(lambda _: task.cancel())

    assert mode.after is not None
    if mode.after == 0:
        transport.watch_loop(UPGRADE_WATCH)
        start()
    else:  # watched from the goal on: a writer that never yields upgrades too
        transport.call_after_traffic(mode.after, start, watch=UPGRADE_WATCH)


def _on_this_host(key: ConnKey) -> bool:
    """A connection to one of our own addresses has the same address at both
    ends (Linux picks the destination as the source), or is loopback."""
    return key[0] == key[2] or _is_loopback(key[2])


@functools.lru_cache(maxsize=256)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


async def _upgrade_client(
    transport: SwitchableTransport, trust: Trust, settings: Settings, where: str
) -> None:
    """Upgrade ``transport``, or leave it on TCP with a fallback reason:
    whatever goes wrong (an unreadable registry, a hostile endpoint, no
    descriptors left) ends in a reason, counted and logged, never in a dead
    task that leaves the connection without one."""
    try:
        conn, records = await _advertised(transport)
        async with asyncio.timeout(settings.handshake_timeout):
            # Half the time for a full accept queue: a busy endpoint is then
            # reported as such, not as a timeout.
            budget = settings.handshake_timeout / 2
            agreement = await agree(records, conn, local_pools(), trust, budget)
        agreement.attach(transport)
    except HandshakeFailed as failed:
        fallback.record(transport, failed.reason, failed.detail, where=where)
    except TimeoutError:
        fallback.record(
            transport,
            fallback.TIMED_OUT,
            f"no agreement within {settings.handshake_timeout} s",
            where=where,
        )
    except Exception as exc:
        _log.debug("upgrade of %s failed", where, exc_info=True)
        fallback.record(transport, fallback.PROTOCOL_ERROR, repr(exc), where=where)


async def _advertised(transport: SwitchableTransport) -> tuple[ConnKey, list[Record]]:
    """The connection's 4-tuple and the records advertising its peer: the
    host registry's, else those the discovery sidecar knows (if it runs)."""
    local, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    if not (isinstance(local, tuple) and isinstance(remote, tuple)):
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, "not an IP connection")
    conn = connection_key(local, remote)
    records: list[Record] = []
    why = "no aiocoloc server advertises it"
    if _on_this_host(conn):
        try:
            records = Registry().lookup(conn[2], conn[3])
        except RegistryError as exc:
            why = str(exc)
        except OSError as exc:  # out of descriptors, say
            why = f"cannot read the registry: {exc}"
    else:
        why = "the peer is not on this host"
    if records:
        return conn, records
    answer = await sidecar.lookup(conn[2], conn[3])
    if answer is None:
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, why)
    if not answer.colocated:
        raise HandshakeFailed(fallback.NOT_COLOCATED, answer.detail)
    if not answer.records:
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, answer.detail)
    return conn, answer.records


# --- server side -----------------------------------------------------------------------


async def create_server(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: ProtocolFactory,
    host: Any = None,
    port: int | None = None,
    *,
    ssl: Any = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    upgrade: str | int | Upgrade | None = None,
    trust: str | Trust | None = None,
    **kwargs: Any,
) -> Server:
    """``loop.create_server`` with every keyword it takes; co-located aiocoloc
    clients of this server can upgrade their connections to shared memory."""
    _check_ssl_options(ssl, None, ssl_handshake_timeout, ssl_shutdown_timeout)
    if ssl and not isinstance(ssl, ssl_module.SSLContext):
        raise TypeError(f"ssl argument must be an SSLContext or None, not {ssl!r}")
    settings, mode, trusted = _options(upgrade, trust)
    let_loop_start_tls(loop)
    endpoint = None if mode.never else ControlEndpoint(loop, settings, trusted)
    on_adopted = endpoint.register if endpoint is not None else None
    pool = None
    if endpoint is not None:
        try:  # the pool lives as long as the server: no client waits for its creation
            pool = local_pools().serving(settings.pool_size)
        except (PoolError, SegmentError, OSError) as exc:
            _log.warning("no shared-memory pool for this server (clients stay on TCP): %s", exc)

    def with_tls() -> asyncio.BaseProtocol:
        return sslproto.SSLProtocol(
            loop,
            protocol_factory(),
            ssl,
            None,  # type: ignore[arg-type]  # no waiter: asyncio's server passes one it never awaits
            server_side=True,
            ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )

    factory = with_tls if ssl else protocol_factory

    def accepted() -> asyncio.BaseProtocol:
        return TcpAdapter(factory, on_adopted, loop=loop)

    try:
        inner = await original(loop, "create_server")(accepted, host, port, **kwargs)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        if pool is not None:
            local_pools().release(pool)
        raise
    registry: Registry | None = None
    records = []
    advertised: list[str] = []
    if endpoint is not None:
        registry = Registry()
        addresses = [
            sock.getsockname()
            for sock in inner.sockets
            if sock.family in (socket.AF_INET, socket.AF_INET6)
        ]
        try:
            for address in addresses:
                records.append(
                    registry.publish(
                        address[0],
                        address[1],
                        endpoint.address,
                        pool=str(pool.id) if pool is not None else None,
                    )
                )
        except (RegistryError, OSError) as exc:
            _log.warning("clients of this server cannot upgrade through the registry: %s", exc)
        # Clients the registry cannot reach ask the discovery sidecar, if any.
        advertised = [sidecar.endpoint_string(a[0], a[1], endpoint.address) for a in addresses]
        advertised += _tcp_controls(endpoint, inner.sockets)
        sidecar.Advertiser.of(loop).add(advertised)
    return Server(inner, endpoint, records, registry, pool, advertised)


def _tcp_controls(endpoint: ControlEndpoint, sockets: Any) -> list[str]:
    """With a cluster key, a TCP control port beside each listening address
    (clients in other VMs upgrade through it), as endpoints to advertise."""
    if cluster_auth() is None:
        return []
    advertised, ports = [], {}
    for sock in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host, port = sock.getsockname()[:2]
        try:
            if (host, sock.family) not in ports:
                ports[host, sock.family] = endpoint.listen_tcp(host, sock.family)
        except OSError as exc:
            _log.warning("no control port for clients in other VMs on %s: %s", host, exc)
            continue
        control = sidecar.tcp_control_string(host, ports[host, sock.family])
        advertised.append(sidecar.endpoint_string(host, port, control))
    return advertised


# --- streams ---------------------------------------------------------------------------


async def open_connection(
    host: str | None = None, port: int | None = None, *, limit: int = 2**16, **kwds: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection``, over shared memory when co-located."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(loop, lambda: protocol, host, port, **kwds)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    host: Any = None,
    port: int | None = None,
    *,
    limit: int = 2**16,
    **kwds: Any,
) -> Server:
    """``asyncio.start_server``, over shared memory for co-located clients."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(loop, factory, host, port, **kwds)
