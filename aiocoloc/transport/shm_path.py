"""The shared-memory side of a connection: ``ShmPath`` (our pipe ends and
the doorbell), closing a pipe end so that the side that closes last frees
the pipe (``close_end``), and ``attach_shared_memory``, which gives a
``SwitchableTransport`` its pipes and control link once a handshake agreed
on them."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiocoloc.control import ControlChannel
from aiocoloc.errors import PoolError
from aiocoloc.notify.doorbell import ControlDoorbell, Doorbell
from aiocoloc.notify.hub import HubDoorbell
from aiocoloc.notify.spin import SpinConfig
from aiocoloc.shm.elastic import ElasticConfig, ElasticProducer

if TYPE_CHECKING:
    from aiocoloc.transport.switchable import SwitchableTransport

__all__ = ["ShmPath", "attach_shared_memory", "close_end"]


class ShmPath:
    """The shared-memory side of a connection.

    ``producer`` writes our outgoing pipe, ``consumer`` reads the incoming
    one (``aiocoloc.ring`` pipe or ring ends); ``doorbell`` wakes the peer and
    wakes us (the connection's own, or its share of a hub, ``aiocoloc.notify.hub``).
    ``on_close(incoming_done, outgoing_done)`` runs once when the
    transport is done with them, to return pipes to their pool: a pipe may
    be freed only when the other side is done with it too (it closed its
    end, or it is gone), else a write or read racing with the free could
    touch slices another pipe already reuses.  So the side that closes last
    frees both.
    """

    def __init__(
        self,
        producer: Any,
        consumer: Any,
        doorbell: Doorbell | ControlDoorbell | HubDoorbell | Any,
        *,
        pool_id: str | None = None,
        on_close: Callable[[bool, bool], None] | None = None,
        resizer: ElasticProducer | None = None,
        spin: SpinConfig | None = None,
    ) -> None:
        self.producer = producer
        self.spin = spin  # busy-wait policy of the reader (None: always sleep)
        self.resizer = resizer  # grows/shrinks the outgoing pipe, if elastic
        self.consumer = consumer
        self.doorbell = doorbell
        self.pool_id = pool_id
        self._on_close = on_close
        self.closed = False
        self._outgoing_done = self._incoming_done = False

    def close(self, peer_gone: bool = False) -> bool:
        """Release the pipe ends and the doorbell.  True if a pipe is left
        that only the peer may free (its end is open): then ``settle`` must
        follow, once it is known whether the peer is gone.  Idempotent."""
        if self.closed:
            return False
        self.closed = True
        self._outgoing_done = close_end(self.producer) or peer_gone
        self._incoming_done = close_end(self.consumer) or peer_gone
        self.doorbell.close()
        if self._outgoing_done and self._incoming_done:
            self.settle(peer_gone=False)
            return False
        return True

    def settle(self, peer_gone: bool) -> None:
        """Give the pipes back after ``close``: ``peer_gone`` frees those the
        peer never closed (it died with them open); otherwise they are left
        to the peer, which frees them when it closes last, or to the pool's
        reaper.  Idempotent."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self._incoming_done or peer_gone, self._outgoing_done or peer_gone)


def close_end(end: Any) -> bool:
    """Close and release one pipe end; True if the peer is done with the pipe.

    Our end is closed *before* we look at the peer's: when both sides close
    at once, both then see the other's flag and both free the pipe (the
    second free fails harmlessly on the generation), where looking first
    could let both miss it and leak the pipe.
    """
    if end.released:
        return False
    done = False
    if not end.corrupted:
        end.close()
        done = bool(end.peer_closed)
    end.release()
    return done


def attach_shared_memory(
    transport: SwitchableTransport,
    pool: Any,
    *,
    send: Any,
    receive: Any,
    listen_fd: int,
    ring_fd: int | None,
    control: ControlChannel | socket.socket,
    socket_bell: bool = False,
    elastic: ElasticConfig | None = ElasticConfig(),  # noqa: B008 - frozen
    spin: SpinConfig | None = SpinConfig(),  # noqa: B008 - frozen
    on_detach: Callable[[], None] | None = None,
    hub: HubDoorbell | None = None,
    doorbell: Any = None,
) -> None:
    """Give ``transport`` the pool pipes ``send``/``receive`` (pipe handles), the
    eventfds it listens on and rings (owned from now on) and the connected
    control socket.  ``hub``: a share of a hub (owned from now on) to use in
    place of the eventfds (-1 then).  With ``socket_bell`` (peers in different
    kernels) the doorbell is a message on the control socket and the eventfds
    (or the share) are closed.
    With ``elastic`` (the default) the outgoing pipe grows and shrinks with
    its demand (``aiocoloc.shm.elastic``); with ``None`` its size stays fixed.
    ``spin`` bounds how long the reader busy-waits before sleeping
    (``aiocoloc.notify.spin``); ``None`` never spins.  ``on_detach`` runs once
    the pipes are given back.  ``doorbell``: a ready-made one (owned from now
    on; an ivshmem interrupt's, ``aiocoloc.notify.vfio_bells``) in place of
    all the above.  Needs a running event loop.
    The transport stays in TCP mode until ``switch_tx``.
    """
    link = control if isinstance(control, ControlChannel) else ControlChannel(control)

    def give_back(incoming_done: bool, outgoing_done: bool) -> None:
        for handle, done in ((receive, incoming_done), (send, outgoing_done)):
            if done:
                try:
                    pool.destroy_pipe(handle)
                except PoolError:
                    pass  # the peer (or the pool's reaper) freed it first
        if on_detach is not None:
            on_detach()

    if socket_bell or doorbell is not None:
        for fd in (listen_fd, ring_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        if hub is not None:
            hub.close()
        if doorbell is None:
            doorbell = ControlDoorbell(link.post_frame)
    elif hub is not None:
        doorbell = hub
    else:
        assert ring_fd is not None
        doorbell = Doorbell(listen_fd, ring_fd)
    producer = pool.pipe_producer(send)
    resizer = ElasticProducer(pool, send, elastic, end=producer) if elastic is not None else None
    path = ShmPath(
        producer,
        pool.pipe_consumer(receive),
        doorbell,
        pool_id=str(pool.id),
        on_close=give_back,
        resizer=resizer,
        spin=spin,
    )
    transport.attach_shm(path, link)
