"""The upgrade handshake between kernels (VMs of one host), client and server.

Within one kernel (``aiocoloc.connect.handshake``) the control socket is an
abstract Unix socket: the peer's uid is known, the pool travels as a memfd
and doorbells are eventfds.  Between VMs none of that crosses the boundary,
so this handshake differs in four ways:

- the control channel is TCP, to the endpoint the server advertises
  (``tcp:HOST:PORT``, ``*`` for "the address this connection reached");
- both sides already map the pool (the host's ivshmem region, found through
  the discovery sidecars): ``hello`` names it and our slot in it, and
  nothing else is offered;
- both prove the cluster key (``aiocoloc.connect.cluster_auth``) with MACs
  over the transcript, and both prove the pool with the nonces each reads
  from the other's pipe, as within one kernel;
- doorbells are ``bell`` messages on the control channel (``socket_bell``),
  or ivshmem interrupts when both processes hold their guest's doorbell
  device (``aiocoloc.notify.vfio_bells``): ``hello.bell`` offers ours,
  ``pipes.bell`` answers with the server's.

    client                                   server
    hello {version, conn, pool, slot, --->   the control connection's source
           auth: challenge C}                address is conn's client address
                                             (else a NAT: refused), finds the
                                             TCP connection by 4-tuple, maps
                                             ``pool``; pipes, nonce A in the pool
                                     <---    pipes {up, down, nonce A,
                                                    auth: MAC_s(C, ..., A)}
    check MAC_s, read A from the pool,
    write nonce B
    proof {nonce B, auth: MAC_c(C, A, B)} -> check MAC_c, read B from the pool
                                     <---    ready

A failure is a ``HandshakeFailed`` with its fallback reason; the TCP
connection is never touched, and the agreement gives everything back.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiocoloc.connect.agreement import Agreement
from aiocoloc.connect.cluster_auth import ClusterAuth
from aiocoloc.connect.colocation import LocalPools
from aiocoloc.connect.handshake import ConnKey, connection_key
from aiocoloc.connect.handshake_steps import (
    expect,
    new_pipe,
    pipe_ref,
    read_nonce,
    receive,
    refuse,
    send,
    serve_or_refuse,
    write_nonce,
)
from aiocoloc.control import ControlChannel
from aiocoloc.control.messages import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Hello,
    Pipes,
    Proof,
    Ready,
)
from aiocoloc.errors import HandshakeAbandoned, HandshakeFailed, PoolError, PoolExhausted
from aiocoloc.notify.vfio_bells import bells_for
from aiocoloc.shm import PipeHandle, Pool
from aiocoloc.transport import fallback

__all__ = ["remote_client_handshake", "remote_server_handshake"]

#: Opens (or takes a new reference on) the pool with this id; None if we do
#: not map it.
OpenPool = Callable[[str], Awaitable[Pool | None]]
Bell = tuple[int, int] | None  # an ivshmem doorbell: (IVPosition, vector)


def _transcript(
    conn: ConnKey, pool: str, hello_bell: Bell, pipes: Pipes, challenge: bytes
) -> tuple[Any, ...]:
    bells = (*(hello_bell or (-1, -1)), *(pipes.bell or (-1, -1)))
    return (challenge, *conn, pool, *bells, *pipes.up, *pipes.down, pipes.nonce)


async def remote_client_handshake(
    sock: socket.socket, conn: ConnKey, pools: LocalPools, pool: Pool, auth: ClusterAuth
) -> Agreement:
    """Run the client side on a connected TCP control socket (owned from now
    on) for the connection ``conn``, through ``pool`` (a reference, owned
    from now on) that the server maps too.  Returns the settled agreement."""
    agreement = Agreement(ControlChannel(sock), pools, server=False)
    agreement.pool = pool
    agreement.socket_bell = True
    channel = agreement.channel
    try:
        challenge = secrets.token_bytes(NONCE_SIZE)
        pool_id = str(pool.id)
        bells = bells_for(pool_id)  # we hold the guest's doorbell device
        bell = bells.position if bells is not None else None
        hello = Hello(PROTOCOL_VERSION, conn, pool_id, pool.slot, auth=challenge, bell=bell)
        await send(channel, hello)
        message, fds = await receive(channel)
        pipes = expect(message, fds, Pipes, 0)
        transcript = _transcript(conn, pool_id, bell, pipes, challenge)
        if not auth.verify(pipes.auth, "server", *transcript):
            raise HandshakeFailed(fallback.NOT_TRUSTED, "the server does not prove our cluster key")
        agreement.send, agreement.receive = PipeHandle(*pipes.up), PipeHandle(*pipes.down)
        if not secrets.compare_digest(read_nonce(pool, agreement.receive), pipes.nonce):
            raise HandshakeFailed(fallback.PROOF_FAILED, "the server's nonce is not in the pool")
        mine = secrets.token_bytes(NONCE_SIZE)
        write_nonce(pool, agreement.send, mine)
        mac = auth.sign("client", *transcript, mine)
        await send(channel, Proof(mine, auth=mac))
        message, fds = await receive(channel)
        expect(message, fds, Ready, 0)
        if bells is not None and pipes.bell is not None:  # the server rings through it too
            agreement.doorbell = bells.doorbell(pipes.bell)
        agreement.settled = True
        return agreement
    except HandshakeFailed as failed:
        if not isinstance(failed, HandshakeAbandoned):
            await refuse(channel, failed)  # the server learns why, not only that we left
        agreement.release()
        raise
    except BaseException:
        agreement.release()
        raise


async def remote_server_handshake(
    sock: socket.socket,
    find: Callable[[ConnKey], Awaitable[Any]],
    pools: LocalPools,
    open_pool: OpenPool,
    auth: ClusterAuth | None,
) -> tuple[Any, Agreement]:
    """Run the server side on an accepted TCP control socket (owned from now
    on).  ``find(conn)`` returns our transport of that TCP connection or
    raises ``HandshakeFailed``; ``auth`` None: we hold no cluster key (every
    client is refused, with the reason)."""
    agreement = Agreement(ControlChannel(sock), pools, server=True)
    agreement.socket_bell = True
    return await serve_or_refuse(agreement, _serve(agreement, sock, find, open_pool, auth))


async def _serve(
    agreement: Agreement,
    sock: socket.socket,
    find: Callable[[ConnKey], Awaitable[Any]],
    open_pool: OpenPool,
    auth: ClusterAuth | None,
) -> Any:
    channel = agreement.channel
    message, fds = await receive(channel)
    hello = expect(message, fds, Hello, 0)
    if auth is None:
        raise HandshakeFailed(
            fallback.NO_CLUSTER_KEY, "the server holds no cluster key ($AIOCOLOC_KEY_FILE)"
        )
    if hello.auth is None:
        raise HandshakeFailed(
            fallback.NOT_TRUSTED, "a control channel between kernels must authenticate"
        )
    if hello.pool is None or hello.slot is None:
        raise HandshakeFailed(
            fallback.POOL_NOT_MAPPABLE, "between kernels the client must name a pool it maps"
        )
    # Named from the client's side: (client ip, port, server ip, port).
    conn = hello.conn
    source = connection_key(sock.getsockname(), sock.getpeername())[2]
    claimed = connection_key((conn[0], conn[1]), (conn[2], conn[3]))
    if claimed[0] != source:
        # The client reached our control port from another address than the
        # one it says its connection has: an address translation sits
        # between us, and its 4-tuple cannot name our side of it.
        raise HandshakeFailed(
            fallback.ADDRESS_TRANSLATED,
            f"the control connection comes from {source}, the client says it is {conn[0]}",
        )
    transport = await find(claimed)
    pool = agreement.pool = await open_pool(hello.pool)
    if pool is None:
        raise HandshakeFailed(fallback.POOL_NOT_MAPPABLE, f"we do not map pool {hello.pool}")
    client = hello.slot
    try:
        agreement.receive = new_pipe(pool, client, pool.slot)
        agreement.send = new_pipe(pool, pool.slot, client)
    except PoolExhausted as exc:
        raise HandshakeFailed(fallback.POOL_EXHAUSTED, str(exc)) from None
    except (PoolError, ValueError) as exc:  # a slot that is no member, say
        raise HandshakeFailed(fallback.PROOF_FAILED, f"cannot create pipes: {exc}") from None
    nonce = secrets.token_bytes(NONCE_SIZE)
    write_nonce(pool, agreement.send, nonce)
    bells = bells_for(hello.pool) if hello.bell is not None else None
    bell = bells.position if bells is not None else None  # both hold a doorbell device
    pipes = Pipes(pipe_ref(agreement.receive), pipe_ref(agreement.send), nonce, bell=bell)
    transcript = _transcript(conn, hello.pool, hello.bell, pipes, hello.auth)
    mac = auth.sign("server", *transcript)
    await send(channel, Pipes(pipes.up, pipes.down, nonce, auth=mac, bell=bell))
    message, fds = await receive(channel)
    proof = expect(message, fds, Proof, 0)
    if not auth.verify(proof.auth, "client", *transcript, proof.nonce):
        raise HandshakeFailed(fallback.NOT_TRUSTED, "the client does not prove our cluster key")
    if not secrets.compare_digest(read_nonce(pool, agreement.receive), proof.nonce):
        raise HandshakeFailed(fallback.PROOF_FAILED, "the client's nonce is not in the pool")
    if bells is not None and hello.bell is not None:
        agreement.doorbell = bells.doorbell(hello.bell)
    await send(channel, Ready())
    agreement.settled = True
    return transport
