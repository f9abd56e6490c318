"""The upgrade handshake on the control socket, client and server side.

After the TCP connection is up, the client connects to the control socket
the server advertises and the two agree on a pair of pipes.  Messages are
control frames (``aiocoloc.control``); descriptors ride along with
SCM_RIGHTS.  Each step either moves on or ends in a ``HandshakeFailed``
carrying a fallback reason (``aiocoloc.transport.fallback``): the TCP connection is
never touched, so a failed handshake leaves it exactly as it was.

    client                                   server
    hello {version, conn: 4-tuple,   --->    trust (SO_PEERCRED), version,
           [pool id, slot]}                  find the TCP connection by 4-tuple
                                     <---    pool {version, pool id} + memfd
    attach the pool
    join {slot}                      --->    create both pipes, write nonce A
                                             into the server->client pipe
                                     <---    pipes {up, down, nonce A} + eventfd
    read nonce A from the pipe (proves
    we map the server's pool), write
    nonce B into the client->server pipe
    proof {nonce B} + eventfd        --->    read nonce B from the pipe
                                     <---    ready
    both sides attach the pipes to the transport and switch their sending
    direction to shared memory at their current byte offset.

Connections between the same two event loops share one pair of eventfds,
a hub (``aiocoloc.notify.hub``).  The client names its hub towards this endpoint
with a random token and offers it in ``hello {..., hub: token}``; a server
that knows hubs answers ``pipes`` with ``hub`` and no eventfd:

    hub: true    it has that hub: ``proof`` comes with no eventfd, and both
                 connections join their side of the hub;
    hub: false   it does not (yet): ``proof`` comes with the hub's two
                 eventfds and its segment (a sealed memfd): [the eventfd the
                 server listens on, the one it rings, the segment]; the
                 server keeps the hub under the token (one hub per token:
                 concurrent handshakes that all send it end up in one).

A peer from before hubs ignores the offer (no ``hub`` in ``pipes``) or
makes none: that connection gets its own eventfds, as above.

Either side may answer ``refuse {reason}`` instead.  The nonces are the first
bytes of each pipe and are consumed before any payload.

A client that has the server's pool open already (the registry names it)
puts its pool id and member slot in ``hello``; when that is the server's
pool, the server skips ``pool``/``join`` and answers with ``pipes`` at once:
one round trip less for every connection after the first.  The proof still
shows that the client maps the pool.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiocoloc.connect.colocation import LocalPools
from aiocoloc.connect.policy import Trust
from aiocoloc.control import FrameDecoder, encode_frame
from aiocoloc.errors import (
    ControlProtocolError,
    HandshakeFailed,
    PoolError,
    PoolExhausted,
    RingError,
    SegmentError,
)
from aiocoloc.notify import hub as hub_module
from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.notify.hub import HubDoorbell, HubTable, is_eventfd
from aiocoloc.shm import PipeHandle, Pool
from aiocoloc.transport import close_end, fallback

__all__ = [
    "PROTOCOL_VERSION",
    "Agreement",
    "Channel",
    "abandon_pipes",
    "client_handshake",
    "connection_key",
    "peer_uid",
    "server_handshake",
]

_log = logging.getLogger("aiocoloc.connect.handshake")

PROTOCOL_VERSION = 1
NONCE_SIZE = 16
#: Slices a new pipe starts with, largest first: a busy pipe should not wait
#: for the elastic policy to be useful, a crowded pool still gets a pipe.
INITIAL_SLICES = (16, 4, 1)
#: A new pipe starts with at most this share of the free slices, so that the
#: connections after it find room too (busy pipes grow by demand later).
INITIAL_SHARE = 1 / 32
#: Longest hub token accepted in ``hello``.
MAX_TOKEN = 64
_MAX_FDS = 4
_CRED = struct.Struct("3i")

ConnKey = tuple[str, int, str, int]


@functools.lru_cache(maxsize=256)  # parsing costs 10 us a connection; addresses repeat
def _normal_ip(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def connection_key(local: Any, remote: Any) -> ConnKey:
    """A TCP connection named by (local ip, local port, remote ip, remote port)."""
    return (_normal_ip(local[0]), int(local[1]), _normal_ip(remote[0]), int(remote[1]))


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return int(uid)


class Channel:
    """Control frames with descriptors over a non-blocking Unix stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder()
        self._messages: collections.deque[dict[str, Any]] = collections.deque()
        self._fds: list[int] = []

    async def _wait(self, writable: bool) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        if writable:
            self._loop.add_writer(fd, ready)
        else:
            self._loop.add_reader(fd, ready)
        try:
            await waiter
        finally:
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    async def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        data = memoryview(encode_frame(message))
        first = True
        while data:
            try:
                if first and fds:
                    sent = socket.send_fds(self.sock, [data], list(fds))
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            except OSError as exc:
                raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"control socket: {exc}") from None
            first = False
            data = data[sent:]

    async def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message, and the descriptors that came since the last one
        (owned by the caller)."""
        while not self._messages:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as exc:
                raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"control socket: {exc}") from None
            self._fds.extend(fds)
            if not data:
                raise HandshakeFailed(fallback.PROTOCOL_ERROR, "the peer closed the control socket")
            try:
                self._messages.extend(self._decoder.feed(data))
            except ControlProtocolError as exc:
                raise HandshakeFailed(fallback.PROTOCOL_ERROR, str(exc)) from None
        fds, self._fds = self._fds, []
        return self._messages.popleft(), fds

    def unread(self) -> bytes:
        """Bytes received after the last message taken (for the control link)."""
        return b"".join(encode_frame(m) for m in self._messages) + self._decoder.pending()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _expect(message: dict[str, Any], fds: list[int], op: str, nfds: int) -> None:
    """Check a message is ``op`` with ``nfds`` descriptors (closing them if not)."""
    got = message.get("op")
    if got == "refuse":
        _close_all(fds)
        reason = message.get("reason")
        if reason not in fallback.REASONS:
            reason = fallback.PROTOCOL_ERROR
        detail = message.get("detail")
        raise HandshakeFailed(
            str(reason), f"peer refused: {detail if isinstance(detail, str) else reason}"
        )
    if got != op:
        _close_all(fds)
        raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"expected {op!r}, got {got!r:.40}")
    if len(fds) != nfds:
        _close_all(fds)
        raise HandshakeFailed(
            fallback.PROTOCOL_ERROR, f"{op!r} came with {len(fds)} descriptors, expected {nfds}"
        )


def _field(message: dict[str, Any], name: str, kind: type) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"{message.get('op')!r}: bad {name!r}")
    return value


def _handle(message: dict[str, Any], name: str) -> PipeHandle:
    value = message.get(name)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in value
        )
    ):
        raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"{message.get('op')!r}: bad {name!r}")
    return PipeHandle(value[0], value[1])


def _write_nonce(pool: Pool, handle: PipeHandle, nonce: bytes) -> None:
    producer = pool.pipe_producer(handle)
    try:
        if not producer.write_all(nonce):
            raise HandshakeFailed(fallback.PROOF_FAILED, "no room for the nonce in a new pipe")
    finally:
        producer.release()


def _read_nonce(pool: Pool, handle: PipeHandle) -> bytes:
    consumer = pool.pipe_consumer(handle)
    try:
        got = bytearray(NONCE_SIZE)
        n = consumer.readinto(got)
        if n != NONCE_SIZE:
            raise HandshakeFailed(
                fallback.PROOF_FAILED, f"found {n or 0} nonce bytes in the pipe, not {NONCE_SIZE}"
            )
        return bytes(got)
    finally:
        consumer.release()


def _new_pipe(pool: Pool, producer: int, consumer: int) -> PipeHandle:
    failure: PoolExhausted | None = None
    room = pool.free_slice_count() * INITIAL_SHARE
    for initial in INITIAL_SLICES:
        if initial > pool.geometry.max_slices_per_pipe or (initial > 1 and initial > room):
            continue
        try:
            return pool.create_pipe(producer, consumer, initial=initial)
        except PoolExhausted as exc:
            failure = exc
    assert failure is not None
    raise failure


def abandon_pipes(pool: Pool, send: PipeHandle, receive: PipeHandle) -> None:
    """Give up agreed pipes we will never use: close our ends, so the peer
    frees them when it closes its own, and free those it is done with."""
    for handle, open_end in ((send, pool.pipe_producer), (receive, pool.pipe_consumer)):
        try:
            done = close_end(open_end(handle))
        except (PoolError, RingError, ValueError):
            continue  # gone already
        if done:
            try:
                pool.destroy_pipe(handle)
            except PoolError:
                pass  # the peer freed it first


@dataclass
class Agreement:
    """What a successful handshake leaves us with (all owned by the holder).

    The doorbell is either the connection's own eventfds, or (``hub`` set,
    the descriptors -1) a share of a hub."""

    pool: Pool
    send: PipeHandle
    receive: PipeHandle
    listen_fd: int
    ring_fd: int
    control: socket.socket
    unread: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)
    hub: HubDoorbell | None = None


async def client_handshake(
    sock: socket.socket,
    conn: ConnKey,
    pools: LocalPools,
    trust: Trust,
    offered: str | None = None,
    hub: HubDoorbell | None = None,
) -> Agreement:
    """Run the client side on a connected control socket (owned from now on:
    closed on failure, handed over in the ``Agreement`` on success).
    ``offered``: the pool id the server advertises, if known.  ``hub``: our
    share of the hub towards this endpoint, to offer (owned from now on too:
    closed on failure or when the server does not take it)."""
    channel = Channel(sock)
    pool: Pool | None = None
    pipes: tuple[PipeHandle, PipeHandle] | None = None
    my_bell = -1
    fds: list[int] = []
    try:
        uid = peer_uid(sock)
        if not trust.allows(uid):
            raise HandshakeFailed(fallback.NOT_TRUSTED, f"control socket belongs to uid {uid}")
        hello: dict[str, Any] = {"op": "hello", "version": PROTOCOL_VERSION, "conn": list(conn)}
        pool = pools.take(offered) if offered is not None else None
        if pool is not None:  # open already: the server may skip pool/join
            hello.update(pool=str(pool.id), slot=pool.slot)
        if hub is not None:
            hello["hub"] = hub.hub.token
        await channel.send(hello)
        message, fds = await channel.recv()
        if message.get("op") == "pool" and message.get("version") != PROTOCOL_VERSION:
            _close_all(fds)
            fds = []
            raise HandshakeFailed(
                fallback.VERSION_MISMATCH,
                f"peer speaks version {message.get('version')!r}, we speak {PROTOCOL_VERSION}",
            )
        if pool is None or message.get("op") != "pipes":
            if pool is not None:  # the server did not take our offer
                pools.release(pool)
                pool = None
            _expect(message, fds, "pool", 1)
            pool_id = _field(message, "pool", str)
            try:
                pool = pools.attach(fds.pop(), pool_id)
            except (PoolError, SegmentError, OSError) as exc:
                reason = (
                    fallback.POOL_EXHAUSTED
                    if isinstance(exc, PoolExhausted)
                    else fallback.POOL_NOT_MAPPABLE
                )
                raise HandshakeFailed(reason, str(exc)) from None
            await channel.send({"op": "join", "slot": pool.slot})
            message, fds = await channel.recv()
        shared = message.get("hub") if hub is not None else None
        ring_fd = -1
        if shared is True or shared is False:  # the server knows hubs: no eventfd
            _expect(message, fds, "pipes", 0)
        else:
            _expect(message, fds, "pipes", 1)
            ring_fd = fds.pop()
            fds = [ring_fd]
            if hub is not None:  # a server from before hubs: our own eventfds
                hub.close()
                hub = None
        up, down = _handle(message, "up"), _handle(message, "down")
        pipes = (up, down)
        nonce = _field(message, "nonce", bytes)
        try:
            found = _read_nonce(pool, down)
        except (PoolError, RingError, ValueError) as exc:
            raise HandshakeFailed(
                fallback.PROOF_FAILED, f"cannot read the server's pipe: {exc}"
            ) from None
        if not secrets.compare_digest(found, nonce):
            raise HandshakeFailed(fallback.PROOF_FAILED, "the server's nonce is not in the pool")
        mine = secrets.token_bytes(NONCE_SIZE)
        try:
            _write_nonce(pool, up, mine)
        except (PoolError, RingError, ValueError) as exc:
            raise HandshakeFailed(fallback.PROOF_FAILED, f"cannot write our pipe: {exc}") from None
        proof: dict[str, Any] = {"op": "proof", "nonce": mine}
        if hub is None:
            my_bell = new_eventfd()
            await channel.send(proof, [my_bell])
        elif shared:  # the server has the hub
            await channel.send(proof)
        else:  # it makes it from ours: it listens on what we ring, and rings what we hear
            shared_hub = hub.hub
            await channel.send(
                proof, [shared_hub.ring_fd, shared_hub.listen_fd, shared_hub.segment.fd]
            )
        message, more = await channel.recv()
        _expect(message, more, "ready", 0)
        return Agreement(pool, up, down, my_bell, ring_fd, sock, channel.unread(), hub=hub)
    except BaseException:
        _close_all(fds)
        if my_bell >= 0:
            os.close(my_bell)
        if hub is not None:
            hub.close()
        if pool is not None:
            if pipes is not None:  # the server may go on with them: tell it we do not
                abandon_pipes(pool, *pipes)
            pools.release(pool)
        channel.close()
        raise


async def server_handshake(
    sock: socket.socket,
    find: Callable[[ConnKey], Awaitable[Any]],
    pools: LocalPools,
    pool_size: int,
    trust: Trust,
    hubs: HubTable | None = None,
) -> tuple[Any, Agreement]:
    """Run the server side on an accepted control socket (owned from now on).

    ``find(conn)`` returns our transport of that TCP connection, or raises
    ``HandshakeFailed``.  Returns it with the agreement.  ``hubs``: the
    endpoint's hubs, None to take no hub offer.
    """
    channel = Channel(sock)
    pool: Pool | None = None
    created: list[PipeHandle] = []
    my_bell = -1
    fds: list[int] = []
    shared: HubDoorbell | None = None

    async def refuse(reason: str, detail: str) -> None:
        try:
            await asyncio.wait_for(
                channel.send({"op": "refuse", "reason": reason, "detail": detail}), 1.0
            )
        except (TimeoutError, HandshakeFailed):
            pass

    try:
        try:
            message, fds = await channel.recv()
            _expect(message, fds, "hello", 0)
            if message.get("version") != PROTOCOL_VERSION:
                raise HandshakeFailed(
                    fallback.VERSION_MISMATCH,
                    f"client speaks version {message.get('version')!r}, we speak {PROTOCOL_VERSION}",
                )
            conn = message.get("conn")
            if (
                not isinstance(conn, list)
                or len(conn) != 4
                or not isinstance(conn[0], str)
                or not isinstance(conn[2], str)
                or not all(isinstance(p, int) and 0 <= p < 65536 for p in (conn[1], conn[3]))
            ):
                raise HandshakeFailed(fallback.PROTOCOL_ERROR, "'hello': bad 'conn'")
            token = message.get("hub") if hubs is not None and hub_module.hubs_usable() else None
            if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN:
                token = None  # no offer (or one we cannot take): our own eventfds
            # Named from the client's side: (client ip, port, server ip, port).
            transport = await find(connection_key((conn[0], conn[1]), (conn[2], conn[3])))
            uid = peer_uid(sock)
            if not trust.allows(uid):
                raise HandshakeFailed(fallback.NOT_TRUSTED, f"client runs as uid {uid}")
            try:
                pool = pools.serving(pool_size)
            except (PoolError, SegmentError, OSError) as exc:
                raise HandshakeFailed(
                    fallback.POOL_NOT_MAPPABLE, f"cannot create a pool: {exc}"
                ) from None
            client = message.get("slot")
            if message.get("pool") != str(pool.id) or not isinstance(client, int):
                await channel.send(
                    {"op": "pool", "version": PROTOCOL_VERSION, "pool": str(pool.id)},
                    [pool.segment.fd],
                )
                message, fds = await channel.recv()
                _expect(message, fds, "join", 0)
                client = _field(message, "slot", int)
            try:
                up = _new_pipe(pool, client, pool.slot)
                created.append(up)
                down = _new_pipe(pool, pool.slot, client)
                created.append(down)
            except PoolExhausted as exc:
                raise HandshakeFailed(fallback.POOL_EXHAUSTED, str(exc)) from None
            except (PoolError, ValueError) as exc:
                raise HandshakeFailed(
                    fallback.PROTOCOL_ERROR, f"cannot create pipes: {exc}"
                ) from None
            nonce = secrets.token_bytes(NONCE_SIZE)
            _write_nonce(pool, down, nonce)
            pipes: dict[str, Any] = {
                "op": "pipes",
                "up": [up.slot, up.generation],
                "down": [down.slot, down.generation],
                "nonce": nonce,
            }
            if token is not None:
                assert hubs is not None
                shared = hubs.join(token)  # held from here: the hub stays open for us
                pipes["hub"] = shared is not None
                await channel.send(pipes)
            else:
                my_bell = new_eventfd()
                await channel.send(pipes, [my_bell])
            message, fds = await channel.recv()
            _expect(message, fds, "proof", 1 if token is None else 0 if shared else 3)
            theirs = _field(message, "nonce", bytes)
            if not secrets.compare_digest(_read_nonce(pool, up), theirs):
                raise HandshakeFailed(
                    fallback.PROOF_FAILED, "the client's nonce is not in the pool"
                )
            if token is not None and shared is None:
                if not (is_eventfd(fds[0]) and is_eventfd(fds[1])):
                    raise HandshakeFailed(
                        fallback.PROTOCOL_ERROR, "'proof': the hub's doorbells are not eventfds"
                    )
                assert hubs is not None
                listen_fd, ring_fd, segment_fd = fds
                fds = []  # the table owns them now, whatever happens
                try:
                    shared = hubs.join_new(token, listen_fd, ring_fd, segment_fd)
                except (SegmentError, OSError) as exc:
                    raise HandshakeFailed(
                        fallback.PROTOCOL_ERROR, f"'proof': cannot use the hub's segment: {exc}"
                    ) from None
            await channel.send({"op": "ready"})
        except HandshakeFailed as failed:
            if failed.reason != fallback.PROTOCOL_ERROR or "closed" not in failed.detail:
                await refuse(failed.reason, failed.detail)
            raise
        ring_fd = fds.pop() if token is None else -1
        unread = channel.unread()
        return transport, Agreement(pool, down, up, my_bell, ring_fd, sock, unread, hub=shared)
    except BaseException:
        _close_all(fds)
        if my_bell >= 0:
            os.close(my_bell)
        if shared is not None:
            shared.close()
        if pool is not None:
            for handle in created:
                try:
                    pool.destroy_pipe(handle)
                except PoolError:
                    pass
            pools.release(pool)
        channel.close()
        raise
