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
import errno
import functools
import ipaddress
import logging
import os
import secrets
import socket
import ssl as ssl_module
import weakref
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiocoloc.connect.agreement import CONTROL_BACKLOG, agree, attach, until_accepted
from aiocoloc.connect.agreement import describe as _describe
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.handshake import ConnKey, connection_key, server_handshake
from aiocoloc.connect.policy import Settings, Trust, Upgrade, current, parse_trust, parse_upgrade
from aiocoloc.connect.registry import Record, Registry
from aiocoloc.errors import ClientGone, HandshakeFailed, PoolError, RegistryError, SegmentError
from aiocoloc.notify.hub import HubTable
from aiocoloc.transport import SwitchableTransport, TcpAdapter, fallback
from aiocoloc.transport.tls import TLS_READY_LOOPS, let_loop_start_tls

__all__ = [
    "Server",
    "create_connection",
    "create_server",
    "install",
    "open_connection",
    "start_server",
    "uninstall",
]

_log = logging.getLogger("aiocoloc.connect")
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

#: How long a control request waits for the server's side of its TCP
#: connection to be accepted (the client's connect returns first); a client
#: that hangs up meanwhile ends the wait at once.
ACCEPT_GRACE = 1.0
#: A server forgets its closed connections every so many accepts (at least).
PRUNE_MIN = 256
#: Pauses of a control endpoint that cannot accept (out of descriptors, say),
#: doubling from the first to the last while the error lasts.
ACCEPT_RETRY_FIRST = 0.05
ACCEPT_RETRY_MAX = 1.0
#: accept() errors saying the process or system is out of a resource.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: While a connection's upgrade runs, a writer that never yields to the event
#: loop is paused once it kept the loop from running this long (seconds):
#: each step of the handshake needs the loop (``SwitchableTransport.watch_loop``).
UPGRADE_WATCH = 0.0005
#: A server's connections, which a client may ask to upgrade at any time: the
#: first step (accepting on the control socket) waits at most this long.
SERVER_WATCH = 0.004


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


# --- the original loop methods (install() replaces them) -------------------------------

#: (loop class, method name) -> (the method it had, whether it defined it itself)
_saved: dict[tuple[type, str], tuple[Any, bool]] = {}


def _original(loop: asyncio.AbstractEventLoop, name: str) -> Callable[..., Awaitable[Any]]:
    """``loop.<name>`` as the loop itself defines it, even when installed."""
    if _saved:
        for klass in type(loop).__mro__:
            saved = _saved.get((klass, name))
            if saved is not None:
                return saved[0].__get__(loop)  # type: ignore[no-any-return]
    return getattr(loop, name)  # type: ignore[no-any-return]


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
    await _original(loop, "create_connection")(lambda: adapter, host, port, **kwargs)
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
        conn, records = _advertised(transport)
        async with asyncio.timeout(settings.handshake_timeout):
            # Half the time for a full accept queue: a busy endpoint is then
            # reported as such, not as a timeout.
            budget = settings.handshake_timeout / 2
            agreement = await agree(records, conn, local_pools(), trust, budget)
        await attach(transport, agreement)
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


def _advertised(transport: SwitchableTransport) -> tuple[ConnKey, list[Record]]:
    """The connection's 4-tuple and the records advertising its peer."""
    local, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    if not (isinstance(local, tuple) and isinstance(remote, tuple)):
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, "not an IP connection")
    conn = connection_key(local, remote)
    if not _on_this_host(conn):
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, "the peer is not on this host")
    try:
        records = Registry().lookup(conn[2], conn[3])
    except RegistryError as exc:
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, str(exc)) from None
    except OSError as exc:  # out of descriptors, say
        raise HandshakeFailed(
            fallback.NO_REGISTRY_ENTRY, f"cannot read the registry: {exc}"
        ) from None
    if not records:
        raise HandshakeFailed(fallback.NO_REGISTRY_ENTRY, "no aiocoloc server advertises it")
    return conn, records


# --- server side -----------------------------------------------------------------------


def _open(ref: weakref.ref[SwitchableTransport]) -> bool:
    """The connection is alive and has not lost its TCP connection yet."""
    transport = ref()
    return transport is not None and not transport.lost


class ControlEndpoint:
    """A server's control socket: runs the server side of handshakes for the
    TCP connections its server accepted (found by their 4-tuple)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings, trust: Trust) -> None:
        self._loop = loop
        self._settings = settings
        self._trust = trust
        # Accepted connections are indexed by (client port, server port) only
        # when a client asks: most never do, and looking up the ports costs
        # two system calls on uvloop.  Addresses are compared on a match.
        # Weak references: a closed connection must be freed at once, with
        # everything its protocol holds.
        self._unindexed: list[weakref.ref[SwitchableTransport]] = []
        self._prune_at = PRUNE_MIN
        self._connections: dict[tuple[int, int], weakref.ref[SwitchableTransport]] = {}
        self._waiting: dict[tuple[int, int], asyncio.Future[SwitchableTransport]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None  # accepting again after a back-off
        self._pause = ACCEPT_RETRY_FIRST
        self.hubs = HubTable(loop)  # shared doorbells, by the clients' tokens
        self.address = f"@aiocoloc-ctl-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind("\0" + self.address[1:])
            self._listener.listen(CONTROL_BACKLOG)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        loop.add_reader(self._listener.fileno(), self._accept)
        self.closed = False

    def register(self, transport: SwitchableTransport) -> None:
        """A connection our server accepted (``TcpAdapter`` callback)."""
        self._unindexed.append(weakref.ref(transport))
        transport.watch_loop(SERVER_WATCH)  # its client may ask to upgrade
        if self._waiting:  # a client asked before its connection was accepted
            self._index()
        elif len(self._unindexed) + len(self._connections) >= self._prune_at:
            self._prune()

    def _index(self) -> None:
        """Index the open connections accepted since the last call."""
        pending, self._unindexed = self._unindexed, []
        for ref in pending:
            transport = ref()
            if transport is None or transport.lost:
                continue
            addresses = transport.tcp_addresses()
            if addresses is None:
                continue
            peer, local = addresses
            if not (isinstance(peer, tuple) and isinstance(local, tuple)):
                continue  # not an IP connection
            ports = (peer[1], local[1])
            self._connections[ports] = ref
            waiter = self._waiting.pop(ports, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(transport)

    def _prune(self) -> None:
        """Forget closed connections; runs after a number of accepts that
        grows with the number open, so each accept pays O(1) for it."""
        self._unindexed = [r for r in self._unindexed if _open(r)]
        for ports, ref in list(self._connections.items()):
            if not _open(ref):
                del self._connections[ports]
        self._prune_at = max(PRUNE_MIN, 2 * (len(self._unindexed) + len(self._connections)))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # that client gave up; the next one may be waiting
            except OSError as exc:
                self._back_off(exc)
                return
            if self._pause != ACCEPT_RETRY_FIRST:
                _log.info("control endpoint %s accepts again", self.address)
                self._pause = ACCEPT_RETRY_FIRST
            task = self._loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _back_off(self, exc: OSError) -> None:
        """Stop accepting for a while: the listener stays readable, so trying
        again at once would spin (asyncio's own servers do the same)."""
        if self._pause == ACCEPT_RETRY_FIRST:  # once per episode, not per attempt
            level = logging.WARNING if exc.errno in _OUT_OF_RESOURCES else logging.ERROR
            _log.log(level, "control endpoint %s cannot accept: %s", self.address, exc)
        self._loop.remove_reader(self._listener.fileno())
        self._retry = self._loop.call_later(self._pause, self._resume)
        self._pause = min(2 * self._pause, ACCEPT_RETRY_MAX)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    async def _find(self, key: ConnKey, sock: socket.socket) -> SwitchableTransport:
        ports = (key[1], key[3])
        if self._unindexed:
            self._index()
        ref = self._connections.get(ports)
        transport = ref() if ref is not None else None
        if ref is not None and not _open(ref):  # closed (and its ports may be reused)
            del self._connections[ports]
            transport = None
        if transport is None:
            waiter = self._waiting.setdefault(ports, self._loop.create_future())
            try:
                transport = await until_accepted(waiter, sock, ACCEPT_GRACE)
            except ClientGone:
                raise HandshakeFailed(
                    fallback.PROTOCOL_ERROR, "the peer closed the control socket"
                ) from None
            finally:
                if self._waiting.get(ports) is waiter and not waiter.done():
                    del self._waiting[ports]
        if transport is None or key != connection_key(
            transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        ):
            raise HandshakeFailed(
                fallback.UNKNOWN_CONNECTION, f"no TCP connection {key} on this server"
            )
        if transport.is_closing() or transport.get_extra_info("aiocoloc")["pool"] is not None:
            raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"connection {key} cannot be upgraded")
        return transport

    async def _serve(self, sock: socket.socket) -> None:
        found: list[SwitchableTransport] = []

        async def find(key: ConnKey) -> SwitchableTransport:
            transport = await self._find(key, sock)
            found.append(transport)
            transport.watch_loop(UPGRADE_WATCH)  # the next steps, quickly
            return transport

        where = "client"
        try:
            async with asyncio.timeout(self._settings.handshake_timeout):
                transport, agreement = await server_handshake(
                    sock, find, local_pools(), self._settings.pool_size, self._trust, self.hubs
                )
            where = _describe(transport.get_extra_info("peername"))
            await attach(transport, agreement)
        except HandshakeFailed as failed:
            if found:
                where = _describe(found[0].get_extra_info("peername"))
                fallback.record(found[0], failed.reason, failed.detail, where=where)
            else:
                # A client that hangs up asked another endpoint too (several
                # processes on one port): no INFO line for each.
                hung_up = failed.reason == fallback.PROTOCOL_ERROR and "closed" in failed.detail
                _log.log(
                    logging.DEBUG if hung_up else logging.INFO,
                    "refused an upgrade from %s: %s (%s)",
                    where,
                    failed.reason,
                    failed.detail,
                )
        except TimeoutError:
            if found:
                fallback.record(found[0], fallback.TIMED_OUT, "handshake too slow", where=where)
        except Exception:
            _log.debug("handshake with %s failed", where, exc_info=True)
            if found:
                fallback.record(found[0], fallback.PROTOCOL_ERROR, "handshake failed", where=where)
        finally:
            if found:  # upgraded, or its client will not ask again
                found[0].watch_loop(None)

    def close(self) -> None:
        """Stop answering; handshakes in progress are abandoned."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:  # backing off: not reading
            self._retry.cancel()
            self._retry = None
        elif not self._loop.is_closed():
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        for waiter in self._waiting.values():
            waiter.cancel()
        self._waiting.clear()


class Server(asyncio.AbstractServer):
    """What ``create_server`` returns: the loop's server, plus the control
    endpoint and registry records that let clients upgrade."""

    #: Servers not closed yet.  The loop keeps its own server alive while it
    #: serves, whether or not the caller keeps it (asyncio's and uvloop's
    #: both); ours must live as long, or its records and pool would go.
    _serving: set[Server] = set()

    def __init__(
        self,
        inner: asyncio.AbstractServer,
        endpoint: ControlEndpoint | None,
        records: Iterable[Any],
        registry: Registry | None,
        pool: Any = None,
    ) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._records = list(records)
        self._registry = registry
        self._pool = pool
        # (Those of loops closed since without closing them go now.)
        Server._serving = {s for s in Server._serving if not s.get_loop().is_closed()}
        Server._serving.add(self)

    @property
    def control_address(self) -> str | None:
        """The control endpoint clients upgrade through (None: upgrades off)."""
        return self._endpoint.address if self._endpoint is not None else None

    def close(self) -> None:
        if self._registry is not None:
            for path in self._records:
                self._registry.withdraw(path)
            self._records.clear()
        if self._endpoint is not None:
            self._endpoint.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            local_pools().release(pool)
        self._inner.close()
        Server._serving.discard(self)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._inner.get_loop()

    def is_serving(self) -> bool:
        return self._inner.is_serving()

    async def start_serving(self) -> None:
        await self._inner.start_serving()

    async def serve_forever(self) -> None:
        try:
            await self._inner.serve_forever()
        finally:
            self.close()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._inner.sockets)  # type: ignore[attr-defined]

    def close_clients(self) -> None:
        self._inner.close_clients()  # type: ignore[attr-defined]

    def abort_clients(self) -> None:
        self._inner.abort_clients()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<aiocoloc.Server sockets={self.sockets!r} control={self.control_address}>"


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
        inner = await _original(loop, "create_server")(accepted, host, port, **kwargs)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        if pool is not None:
            local_pools().release(pool)
        raise
    registry: Registry | None = None
    records = []
    if endpoint is not None:
        registry = Registry()
        try:
            for sock in inner.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    address = sock.getsockname()
                    records.append(
                        registry.publish(
                            address[0],
                            address[1],
                            endpoint.address,
                            pool=str(pool.id) if pool is not None else None,
                        )
                    )
        except (RegistryError, OSError) as exc:
            _log.warning("clients of this server cannot upgrade: %s", exc)
    return Server(inner, endpoint, records, registry, pool)


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


# --- install ---------------------------------------------------------------------------


async def _routed_create_connection(
    self: asyncio.AbstractEventLoop, protocol_factory: ProtocolFactory, *args: Any, **kwargs: Any
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    return await create_connection(self, protocol_factory, *args, **kwargs)


async def _routed_create_server(
    self: asyncio.AbstractEventLoop, protocol_factory: ProtocolFactory, *args: Any, **kwargs: Any
) -> Server:
    return await create_server(self, protocol_factory, *args, **kwargs)


_ROUTED = {"create_connection": _routed_create_connection, "create_server": _routed_create_server}


def _loop_classes() -> list[type]:
    classes: list[type] = [asyncio.BaseEventLoop]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    else:
        classes.append(uvloop.Loop)
    return classes


def install() -> None:
    """Route ``create_connection``/``create_server`` of every event loop
    (asyncio's and uvloop's) through aiocoloc, so unmodified libraries get
    shared memory when co-located.  Idempotent; ``uninstall()`` undoes it."""
    for klass in _loop_classes():
        for name, routed in _ROUTED.items():
            if (klass, name) not in _saved:
                _saved[(klass, name)] = (getattr(klass, name), name in klass.__dict__)
                setattr(klass, name, routed)
    _log.debug("installed on %s", [k.__name__ for k in _loop_classes()])


def uninstall() -> None:
    """Give the loops their own methods back."""
    for (klass, name), (function, own) in list(_saved.items()):
        if own:
            setattr(klass, name, function)
        else:
            delattr(klass, name)
        del _saved[(klass, name)]


def installed() -> bool:
    return bool(_saved)
