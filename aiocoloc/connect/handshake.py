"""The upgrade handshake on the control socket, client and server side.

After the TCP connection is up, the client connects to the control socket
the server advertises and the two agree on a pair of pipes.  Messages are
``aiocoloc.control.messages`` on a ``ControlChannel``; descriptors ride
along with SCM_RIGHTS.  Each step either moves on or ends in a
``HandshakeFailed`` carrying a fallback reason (``aiocoloc.transport.fallback``):
the TCP connection is never touched, so a failed handshake leaves it exactly
as it was.  What the steps gather is held by an ``Agreement``
(``aiocoloc.connect.agreement``), which attaches it or gives it back.

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

Either side may answer ``refuse {reason, detail}`` instead; a side whose
peer hung up refuses nothing (``HandshakeAbandoned``).  The nonces are the first
bytes of each pipe and are consumed before any payload.

A client that has the server's pool open already (the registry names it)
puts its pool id and member slot in ``hello``; when that is the server's
pool, the server skips ``pool``/``join`` and answers with ``pipes`` at once:
one round trip less for every connection after the first.  The proof still
shows that the client maps the pool.

The proof is needed once per pool, client slot and hub: the hub is the
client process's (its token a secret only the two ends hold), so both ends
remember the pools proved over it (``Hub.proven``).  A client that proved
the pool over the hub it offers says so (``hello {..., proven: true}``);
a server that remembers the same answers ``pipes {..., ready: true}``: the
client checks nonce A as always, writes no nonce B and sends no ``proof``,
and both sides attach at once -- a round trip less again.  Either side that
does not remember it runs the handshake above.  Such a ``pipes`` may name
pipes the server made ahead, while the hub rested (``spare_pipes``): the
nonce in them is as fresh, and was written the same way.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiocoloc.connect.agreement import Agreement
from aiocoloc.connect.colocation import LocalPools
from aiocoloc.connect.handshake_steps import (
    close_all,
    expect,
    new_pipe,
    pipe_ref,
    read_nonce,
    receive,
    send,
    serve_or_refuse,
    write_nonce,
)
from aiocoloc.connect.policy import Trust
from aiocoloc.connect.spare_pipes import take_spare
from aiocoloc.control import ControlChannel
from aiocoloc.control.messages import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Hello,
    Join,
    Pipes,
    PoolOffer,
    Proof,
    Ready,
)
from aiocoloc.errors import (
    HandshakeFailed,
    PoolError,
    PoolExhausted,
    SegmentError,
)
from aiocoloc.notify import hub as hub_module
from aiocoloc.notify.doorbell import new_eventfd
from aiocoloc.notify.hub import HubDoorbell, HubTable, is_eventfd
from aiocoloc.shm import PipeHandle, Pool
from aiocoloc.transport import fallback

__all__ = [
    "ConnKey",
    "client_handshake",
    "connection_key",
    "peer_uid",
    "server_handshake",
]

_log = logging.getLogger("aiocoloc.connect.handshake")

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


# --- the client ------------------------------------------------------------------------


async def client_handshake(
    sock: socket.socket,
    conn: ConnKey,
    pools: LocalPools,
    trust: Trust,
    offered: str | None = None,
    hub: HubDoorbell | None = None,
) -> Agreement:
    """Run the client side on a connected control socket (owned from now on,
    as is ``hub``, our share of the hub towards this endpoint, to offer).
    ``offered``: the pool id the server advertises, if known.  Returns the
    settled agreement; on failure everything is given back."""
    agreement = Agreement(ControlChannel(sock), pools, server=False)
    agreement.hub = hub
    channel = agreement.channel
    try:
        uid = peer_uid(sock)
        if not trust.allows(uid):
            raise HandshakeFailed(fallback.NOT_TRUSTED, f"control socket belongs to uid {uid}")
        pool = agreement.pool = pools.take(offered) if offered is not None else None
        proven = (
            hub is not None and pool is not None and (str(pool.id), pool.slot) in hub.hub.proven
        )
        await send(
            channel,
            Hello(
                PROTOCOL_VERSION,
                conn,
                pool=str(pool.id) if pool is not None else None,  # the server may skip pool/join
                slot=pool.slot if pool is not None else None,
                hub=hub.hub.token if hub is not None else None,
                proven=True if proven else None,  # the server may skip our proof
            ),
        )
        message, fds = await receive(channel)
        if pool is None or not isinstance(message, Pipes):
            proven = False  # (a pool we map now: never proved over this hub)
            if pool is not None:  # the server did not take our offer
                agreement.pool = None
                pools.release(pool)
            offer = expect(message, fds, PoolOffer, 1)
            try:
                pool = agreement.pool = pools.attach(fds.pop(), offer.pool)
            except (PoolError, SegmentError, OSError) as exc:
                reason = (
                    fallback.POOL_EXHAUSTED
                    if isinstance(exc, PoolExhausted)
                    else fallback.POOL_NOT_MAPPABLE
                )
                raise HandshakeFailed(reason, str(exc)) from None
            await send(channel, Join(pool.slot))
            message, fds = await receive(channel)
        if hub is not None and isinstance(message, Pipes) and message.hub is not None:
            pipes = expect(message, fds, Pipes, 0)  # the server knows hubs: no eventfd
        else:
            pipes = expect(message, fds, Pipes, 1)
            agreement.ring_fd = fds.pop()
            if hub is not None:  # a server from before hubs: our own eventfds
                hub.close()
                agreement.hub = hub = None
        agreement.send, agreement.receive = PipeHandle(*pipes.up), PipeHandle(*pipes.down)
        if pipes.ready and not (proven and pipes.hub):
            raise HandshakeFailed(fallback.PROTOCOL_ERROR, "'pipes': ready without our proof")
        if not secrets.compare_digest(read_nonce(pool, agreement.receive), pipes.nonce):
            raise HandshakeFailed(fallback.PROOF_FAILED, "the server's nonce is not in the pool")
        if pipes.ready:  # we proved this pool over this hub before: settled
            agreement.settled = True
            return agreement
        mine = secrets.token_bytes(NONCE_SIZE)
        write_nonce(pool, agreement.send, mine)
        if hub is None:
            agreement.listen_fd = new_eventfd()
            await send(channel, Proof(mine), [agreement.listen_fd])
        elif pipes.hub:  # the server has the hub
            await send(channel, Proof(mine))
        else:  # it makes it from ours: it listens on what we ring, and rings what we hear
            shared = hub.hub
            await send(channel, Proof(mine), [shared.ring_fd, shared.listen_fd, shared.segment.fd])
        message, fds = await receive(channel)
        expect(message, fds, Ready, 0)
        agreement.settled = True
        if hub is not None:  # the next handshake over this hub may skip the proof
            hub.hub.proven.add((str(pool.id), pool.slot))
        return agreement
    except BaseException:
        agreement.release()
        raise


# --- the server ------------------------------------------------------------------------


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
    ``HandshakeFailed``.  Returns it with the settled agreement; on failure
    the client is told why (unless it hung up) and everything is given back.
    ``hubs``: the endpoint's hubs, None to take no hub offer."""
    agreement = Agreement(ControlChannel(sock), pools, server=True)
    steps = _serve(agreement, sock, find, pools, pool_size, trust, hubs)
    return await serve_or_refuse(agreement, steps)


async def _make_pipes(agreement: Agreement, hello: Hello, pool: Pool) -> tuple[int, bool]:
    """Offer ``pool`` unless the client maps it already, then create the two
    pipes; returns the client's member slot, and whether it mapped the pool
    already (no ``pool``/``join``)."""
    channel = agreement.channel
    client = hello.slot
    mapped = hello.pool == str(pool.id) and client is not None
    if not mapped:
        await send(channel, PoolOffer(PROTOCOL_VERSION, str(pool.id)), [pool.segment.fd])
        message, fds = await receive(channel)
        client = expect(message, fds, Join, 0).slot
    assert client is not None
    try:
        agreement.receive = new_pipe(pool, client, pool.slot)
        agreement.send = new_pipe(pool, pool.slot, client)
    except PoolExhausted as exc:
        raise HandshakeFailed(fallback.POOL_EXHAUSTED, str(exc)) from None
    except (PoolError, ValueError) as exc:
        raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"cannot create pipes: {exc}") from None
    return client, mapped


async def _serve(
    agreement: Agreement,
    sock: socket.socket,
    find: Callable[[ConnKey], Awaitable[Any]],
    pools: LocalPools,
    pool_size: int,
    trust: Trust,
    hubs: HubTable | None,
) -> Any:
    channel = agreement.channel
    message, fds = await receive(channel)
    hello = expect(message, fds, Hello, 0)
    usable = hubs is not None and hub_module.hubs_usable()
    token = hello.hub if usable and hello.hub else None  # else: our own eventfds
    # Named from the client's side: (client ip, port, server ip, port).
    conn = hello.conn
    transport = await find(connection_key((conn[0], conn[1]), (conn[2], conn[3])))
    uid = peer_uid(sock)
    if not trust.allows(uid):
        raise HandshakeFailed(fallback.NOT_TRUSTED, f"client runs as uid {uid}")
    shared = None
    if token is not None:
        assert hubs is not None
        shared = agreement.hub = hubs.join(token)  # held from here: the hub stays open for us
    claimed = (hello.pool, hello.slot) if hello.proven and hello.slot is not None else None
    known_claim = shared is not None and claimed in shared.hub.proven
    spare = None
    if known_claim:
        assert shared is not None and hello.pool is not None and hello.slot is not None
        spare = take_spare(shared.hub, hello.pool, hello.slot)
    if spare is not None:  # made ahead for this client (``spare_pipes``): owned from here
        pool = agreement.pool = spare.pool
        agreement.receive, agreement.send = spare.receive, spare.send
        client, mapped, nonce = spare.client, True, spare.nonce
    else:
        try:
            pool = agreement.pool = pools.serving(pool_size, reserve=True)
        except (PoolError, SegmentError, OSError) as exc:
            raise HandshakeFailed(
                fallback.POOL_NOT_MAPPABLE, f"cannot create a pool: {exc}"
            ) from None
        try:  # the room reserved in the pool is taken by our pipes, or given up
            client, mapped = await _make_pipes(agreement, hello, pool)
        finally:
            pools.unreserve(pool)
        assert agreement.send is not None
        nonce = secrets.token_bytes(NONCE_SIZE)
        write_nonce(pool, agreement.send, nonce)
    assert agreement.receive is not None and agreement.send is not None
    agreement.client_slot = client
    pipes = Pipes(pipe_ref(agreement.receive), pipe_ref(agreement.send), nonce)
    proved = (str(pool.id), client)  # what the client's proof shows, over its hub
    if token is not None:
        if shared is not None and mapped and known_claim and proved == claimed:
            # Proved over this hub before (the module docstring): settled.
            await send(channel, Pipes(pipes.up, pipes.down, nonce, hub=True, ready=True))
            agreement.settled = True
            return transport
        await send(channel, Pipes(pipes.up, pipes.down, nonce, hub=shared is not None))
    else:
        agreement.listen_fd = new_eventfd()
        await send(channel, pipes, [agreement.listen_fd])
    message, fds = await receive(channel)
    known = agreement.hub is not None
    proof = expect(message, fds, Proof, 1 if token is None else 0 if known else 3)
    try:
        found = read_nonce(pool, agreement.receive)
    except BaseException:
        close_all(fds)
        raise
    if not secrets.compare_digest(found, proof.nonce):
        close_all(fds)
        raise HandshakeFailed(fallback.PROOF_FAILED, "the client's nonce is not in the pool")
    if token is None:
        agreement.ring_fd = fds.pop()
    elif not known:
        assert hubs is not None
        if not (is_eventfd(fds[0]) and is_eventfd(fds[1])):
            close_all(fds)
            raise HandshakeFailed(
                fallback.PROTOCOL_ERROR, "'proof': the hub's doorbells are not eventfds"
            )
        listen_fd, ring_fd, segment_fd = fds
        fds.clear()  # the table owns them now, whatever happens
        try:
            agreement.hub = hubs.join_new(token, listen_fd, ring_fd, segment_fd)
        except (SegmentError, OSError) as exc:
            raise HandshakeFailed(
                fallback.PROTOCOL_ERROR, f"'proof': cannot use the hub's segment: {exc}"
            ) from None
    if agreement.hub is not None:  # the next handshake over this hub may skip the proof
        agreement.hub.hub.proven.add(proved)
    await send(channel, Ready())
    agreement.settled = True
    return transport
