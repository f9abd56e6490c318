"""A server's control endpoint: the abstract Unix socket its co-located
clients ask for upgrades on (and TCP ports for clients in other kernels
that share a pool with us, when a cluster key is configured), the index of the TCP connections its server
accepted (looked up by 4-tuple only when a client asks), and the server side
of the handshake for each request."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import secrets
import socket
import weakref

from aiocoloc.connect import sidecar
from aiocoloc.connect.agreement import Agreement
from aiocoloc.connect.cluster_auth import cluster_auth
from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.handshake import ConnKey, connection_key, server_handshake
from aiocoloc.connect.policy import SERVER_WATCH, UPGRADE_WATCH, Settings, Trust
from aiocoloc.connect.remote_handshake import remote_server_handshake
from aiocoloc.connect.rendezvous import CONTROL_BACKLOG, until_accepted
from aiocoloc.connect.rendezvous import describe as _describe
from aiocoloc.connect.spare_pipes import make_spare
from aiocoloc.errors import ClientGone, HandshakeAbandoned, HandshakeFailed
from aiocoloc.notify.hub import HubTable
from aiocoloc.transport import SwitchableTransport, fallback

__all__ = ["ControlEndpoint"]

_log = logging.getLogger("aiocoloc.connect")

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


def _alive(ref: weakref.ref[SwitchableTransport]) -> bool:
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
        self.hubs = HubTable(loop, settings.hub_linger)  # shared doorbells, by the clients' tokens
        self.address = f"@aiocoloc-ctl-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind("\0" + self.address[1:])
            self._listener.listen(CONTROL_BACKLOG)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._listeners = [self._listener]  # and TCP ones, between kernels (``listen_tcp``)
        loop.add_reader(self._listener.fileno(), self._accept, self._listener)
        self.closed = False

    def listen_tcp(self, host: str, family: socket.AddressFamily) -> int:
        """Also take handshakes from other kernels (VMs sharing a pool with
        us) on a TCP port of ``host``; returns the port.  Their clients must
        prove the cluster key (``aiocoloc.connect.remote_handshake``)."""
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind((host, 0))
            listener.listen(CONTROL_BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listeners.append(listener)
        if self._retry is None:
            self._loop.add_reader(listener.fileno(), self._accept, listener)
        port: int = listener.getsockname()[1]
        return port

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
        self._unindexed = [r for r in self._unindexed if _alive(r)]
        for ports, ref in list(self._connections.items()):
            if not _alive(ref):
                del self._connections[ports]
        self._prune_at = max(PRUNE_MIN, 2 * (len(self._unindexed) + len(self._connections)))

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
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
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._retry = self._loop.call_later(self._pause, self._resume)
        self._pause = min(2 * self._pause, ACCEPT_RETRY_MAX)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            for listener in self._listeners:
                self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def _find(self, key: ConnKey, sock: socket.socket) -> SwitchableTransport:
        ports = (key[1], key[3])
        if self._unindexed:
            self._index()
        ref = self._connections.get(ports)
        transport = ref() if ref is not None else None
        if ref is not None and not _alive(ref):  # closed (and its ports may be reused)
            del self._connections[ports]
            transport = None
        if transport is None:
            waiter = self._waiting.setdefault(ports, self._loop.create_future())
            try:
                transport = await until_accepted(waiter, sock, ACCEPT_GRACE)
            except ClientGone:
                raise HandshakeAbandoned(
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
                if sock.family == socket.AF_UNIX:
                    transport, agreement = await server_handshake(
                        sock, find, local_pools(), self._settings.pool_size, self._trust, self.hubs
                    )
                else:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    transport, agreement = await remote_server_handshake(
                        sock, find, local_pools(), sidecar.open_shared_pool, cluster_auth()
                    )
            where = _describe(transport.get_extra_info("peername"))
            agreement.attach(transport)
            self._prepare_next(agreement)
        except HandshakeFailed as failed:
            if found:
                where = _describe(found[0].get_extra_info("peername"))
                fallback.record(found[0], failed.reason, failed.detail, where=where)
            else:
                # A client that hangs up asked another endpoint too (several
                # processes on one port): no INFO line for each.
                _log.log(
                    logging.DEBUG if isinstance(failed, HandshakeAbandoned) else logging.INFO,
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

    def _prepare_next(self, agreement: Agreement) -> None:
        """When the hub this connection came over rests, make the pipes of
        the next connection over it (``aiocoloc.connect.spare_pipes``)."""
        member, pool, client = agreement.hub, agreement.pool, agreement.client_slot
        if member is None or pool is None or client is None:
            return
        hub = member.hub
        if (str(pool.id), client) in hub.proven:
            hub.on_rest = functools.partial(make_spare, local_pools(), pool, client)

    def close(self) -> None:
        """Stop answering; handshakes in progress are abandoned."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:  # backing off: not reading
            self._retry.cancel()
            self._retry = None
        elif not self._loop.is_closed():
            for listener in self._listeners:
                self._loop.remove_reader(listener.fileno())
        for listener in self._listeners:
            listener.close()
        for task in list(self._tasks):
            task.cancel()
        for waiter in self._waiting.values():
            waiter.cancel()
        self._waiting.clear()
        self.hubs.close()
