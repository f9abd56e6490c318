"""Finding the control endpoint that knows a connection.

A client asks every control endpoint advertised for its destination at once
(``agree``): with several processes on one port (``SO_REUSEPORT``) only the
one whose server accepted the TCP connection knows it.  The first agreement
wins and the other attempts are closed at once, which tells their servers to
stop waiting (``until_accepted``).  Either side then attaches the agreement
(``aiocoloc.connect.agreement``) to its transport.

Whatever goes wrong here ends in ``HandshakeFailed`` with a fallback reason
(``aiocoloc.transport.fallback``): the TCP connection is never touched.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Sequence
from typing import Any

from aiocoloc.connect import policy, sidecar
from aiocoloc.connect.agreement import Agreement
from aiocoloc.connect.cluster_auth import cluster_auth
from aiocoloc.connect.colocation import LocalPools
from aiocoloc.connect.handshake import ConnKey, client_handshake
from aiocoloc.connect.policy import Trust
from aiocoloc.connect.registry import Record
from aiocoloc.connect.remote_handshake import remote_client_handshake
from aiocoloc.errors import ClientGone, HandshakeFailed, SegmentError
from aiocoloc.notify import hub
from aiocoloc.transport import SwitchableTransport, fallback

__all__ = [
    "CONTROL_BACKLOG",
    "agree",
    "connect_control",
    "connect_tcp_control",
    "describe",
    "until_accepted",
]

#: Accept queue of a control socket: a burst of connections that all upgrade
#: at once must not find it full.  The kernel caps it at net.core.somaxconn.
CONTROL_BACKLOG = 65535
#: Pauses between connects to a control socket whose accept queue is full
#: (doubling from the first to the last).
RETRY_FIRST = 0.002
RETRY_MAX = 0.1
#: Failures that only say "not this endpoint", ranked by how much they tell:
#: the most telling is reported when no endpoint agrees.
_NOT_THIS_ONE = {fallback.NOT_AIOCOLOC: 0, fallback.UNKNOWN_CONNECTION: 1, fallback.CONTROL_BUSY: 2}


def describe(address: Any) -> str:
    """``host:port`` of a socket address, for logs and fallback records."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


# --- client side -----------------------------------------------------------------------


async def connect_control(address: str, budget: float) -> socket.socket:
    """A connected socket to the control endpoint at ``address``.

    A non-blocking connect to a Unix socket whose accept queue is full fails
    with EAGAIN; the loop then waits for writability and reports success on a
    socket that is not connected (its peer credentials read as uid -1).  Such
    a connect is retried with back-off for ``budget`` seconds."""
    loop = asyncio.get_running_loop()
    path = "\0" + address[1:] if address.startswith("@") else address
    give_up = loop.time() + budget
    pause = RETRY_FIRST
    tries = 0
    while True:
        tries += 1
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise HandshakeFailed(
                fallback.PROTOCOL_ERROR, f"cannot open a control socket: {exc}"
            ) from None
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, path)
            sock.getpeername()  # ENOTCONN: the accept queue was full
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOTCONN, errno.EAGAIN):
                raise HandshakeFailed(
                    fallback.NOT_AIOCOLOC, f"control endpoint {address} does not answer: {exc}"
                ) from None
        except BaseException:
            sock.close()
            raise
        if loop.time() + pause > give_up:
            raise HandshakeFailed(
                fallback.CONTROL_BUSY,
                f"the accept queue of {address} stayed full ({tries} connects in {budget:.2f} s)",
            )
        await asyncio.sleep(pause)
        pause = min(2 * pause, RETRY_MAX)


async def connect_tcp_control(host: str, port: int, budget: float) -> socket.socket:
    """A connected TCP socket to a control endpoint between kernels."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HandshakeFailed(
            fallback.PROTOCOL_ERROR, f"cannot open a control socket to {host}:{port}: {exc}"
        ) from None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # doorbells are tiny
        async with asyncio.timeout(budget):
            await loop.sock_connect(sock, address)
        return sock
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise HandshakeFailed(
            fallback.NOT_AIOCOLOC, f"control endpoint {host}:{port} does not answer: {exc!r}"
        ) from None
    except BaseException:
        sock.close()
        raise


async def _attempt_remote(
    record: Record, conn: ConnKey, pools: LocalPools, budget: float
) -> Agreement:
    """The handshake with a server in another kernel (VM) that shares a pool
    with us: over TCP, authenticated with the cluster key."""
    address = sidecar.tcp_control_address(record.control, conn[2])
    assert address is not None
    auth = cluster_auth()
    if auth is None:
        raise HandshakeFailed(
            fallback.NO_CLUSTER_KEY,
            f"{record.control} is in another kernel: a cluster key ($AIOCOLOC_KEY_FILE) is needed",
        )
    if record.pool is None:
        raise HandshakeFailed(fallback.POOL_NOT_MAPPABLE, "the sidecar names no shared pool")
    pool = await sidecar.open_shared_pool(record.pool)
    if pool is None:
        raise HandshakeFailed(
            fallback.POOL_NOT_MAPPABLE, f"cannot map pool {record.pool} in this process"
        )
    try:
        control = await connect_tcp_control(*address, budget)
    except BaseException:
        pools.release(pool)
        raise
    return await remote_client_handshake(control, conn, pools, pool, auth)


async def _attempt(
    record: Record, conn: ConnKey, pools: LocalPools, trust: Trust, budget: float
) -> Agreement:
    if record.control.startswith("tcp:"):
        return await _attempt_remote(record, conn, pools, budget)
    control = await connect_control(record.control, budget)
    shared = None
    if hub.hubs_usable():
        try:
            shared = hub.join_client_hub(record.control, policy.current().hub_linger)
        except (OSError, SegmentError):  # out of descriptors, say: this one offers none
            pass
    return await client_handshake(control, conn, pools, trust, record.pool, shared)


async def agree(
    records: Sequence[Record], conn: ConnKey, pools: LocalPools, trust: Trust, budget: float
) -> Agreement:
    """Handshake with every advertised endpoint at once and keep the first
    agreement; the others are cancelled (their sockets closed) at once.

    With several processes on one port (SO_REUSEPORT) only the one that
    accepted the connection knows it, and the others would only say so after
    their ``ACCEPT_GRACE``.  ``budget``: seconds a full accept queue is
    retried."""
    if len(records) == 1:  # the common case: no task
        return await _attempt(records[0], conn, pools, trust, budget)
    loop = asyncio.get_running_loop()
    pending = {loop.create_task(_attempt(r, conn, pools, trust, budget)) for r in records}
    failure: HandshakeFailed | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            outcomes = [(task, task.exception()) for task in done if not task.cancelled()]
            agreements = [task.result() for task, exc in outcomes if exc is None]
            if agreements:
                for extra in agreements[1:]:  # two endpoints that both claim us
                    extra.release()
                return agreements[0]
            for _, exc in outcomes:
                assert exc is not None
                if not isinstance(exc, HandshakeFailed) or exc.reason not in _NOT_THIS_ONE:
                    raise exc  # a real failure of the endpoint that knows us
                if failure is None or _NOT_THIS_ONE[exc.reason] > _NOT_THIS_ONE[failure.reason]:
                    failure = exc
    finally:
        for task in pending:
            task.cancel()
        if pending:  # let them close their sockets before we go on
            await asyncio.wait(pending)
            for task in pending:
                if not task.cancelled() and task.exception() is None:
                    task.result().release()
    assert failure is not None
    raise failure


# --- server side -----------------------------------------------------------------------


async def until_accepted(
    waiter: asyncio.Future[SwitchableTransport], sock: socket.socket, grace: float
) -> SwitchableTransport | None:
    """``waiter``'s transport once our server accepted the connection, None
    after ``grace`` seconds; raises ``ClientGone`` at once if the client
    hangs up meanwhile (it found the endpoint that knows it).  ``waiter`` is
    shared by the requests for one connection: it is never cancelled here."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def readable() -> None:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        loop.remove_reader(fd)  # a byte ahead of time is the handshake's business
        if not data and not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait((waiter, gone), timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        gone.cancel()
    if waiter.done() and not waiter.cancelled():
        return waiter.result()
    if gone.done() and not gone.cancelled():
        raise ClientGone
    return None
