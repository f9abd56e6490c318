"""``Agreement``: everything one upgrade handshake agrees on, with one owner.

A handshake (``aiocoloc.connect.handshake``) fills an agreement step by
step: the reference on the pool, the two pipes, the doorbell (the
connection's own eventfds, or its share of a hub) and the control channel.
Then exactly one of two things happens to all of it: ``attach`` hands it to
a transport (which gives it back when it closes), or ``release`` gives it
back now -- on any failure, in the handshake or after it.  Nothing else
closes, frees or releases what an agreement holds.
"""

from __future__ import annotations

import logging
import os

from aiocoloc.connect.colocation import LocalPools
from aiocoloc.control import ControlChannel
from aiocoloc.control.messages import Close
from aiocoloc.errors import PoolError, RingError
from aiocoloc.notify.hub import HubDoorbell
from aiocoloc.notify.vfio_bells import VfioDoorbell
from aiocoloc.shm import PipeHandle, Pool
from aiocoloc.transport import SwitchableTransport, attach_shared_memory, close_end, fallback

__all__ = ["Agreement", "abandon_pipes"]

_log = logging.getLogger("aiocoloc.connect.agreement")


class Agreement:
    """What a handshake agreed on so far (``settled`` once both sides said so)."""

    def __init__(self, channel: ControlChannel, pools: LocalPools, *, server: bool) -> None:
        self.channel = channel
        self._pools = pools
        self._server = server
        self.pool: Pool | None = None  # a reference held on it (``pools``)
        self.send: PipeHandle | None = None  # our outgoing pipe
        self.receive: PipeHandle | None = None  # our incoming pipe
        self.listen_fd = -1  # our own doorbell's eventfds (-1: none, or a hub's share)
        self.ring_fd = -1
        self.hub: HubDoorbell | None = None
        self.socket_bell = False  # peers in different kernels: doorbells are messages
        self.doorbell: VfioDoorbell | None = None  # ... or ivshmem interrupts
        self.client_slot: int | None = None  # the client's member slot (server side)
        self.settled = False  # both sides reached ``ready``
        self._done = False  # attached or released

    def attach(self, transport: SwitchableTransport) -> None:
        """Give everything to ``transport`` and send our bytes through the
        pipes; a transport that closed meanwhile gets nothing (released)."""
        if self._done:
            raise RuntimeError("this agreement was attached or released already")
        if not self.settled:
            raise RuntimeError("the handshake has not settled this agreement")
        pool, send, receive = self.pool, self.send, self.receive
        assert pool is not None and send is not None and receive is not None
        if transport.is_closing():
            self.release()
            return
        pools = self._pools
        try:
            attach_shared_memory(
                transport,
                pool,
                send=send,
                receive=receive,
                listen_fd=self.listen_fd,
                ring_fd=self.ring_fd,
                control=self.channel,
                on_detach=lambda: pools.release(pool),
                hub=self.hub,
                socket_bell=self.socket_bell,
                doorbell=self.doorbell,
            )
        except BaseException:
            self.release()
            raise
        self._done = True  # the transport owns it all now
        if transport.is_closing():
            return  # closing gives the pipes back
        if not transport.tx_finished:  # after write_eof() only the other direction moves
            transport.switch_tx("shm")
        fallback.record_upgrade()

    def release(self) -> None:
        """Give everything back.  Idempotent; a no-op once attached."""
        if self._done:
            return
        self._done = True
        pool = self.pool
        if pool is not None:
            made = [h for h in (self.send, self.receive) if h is not None]
            if self._server and not self.settled:
                for handle in made:  # the client may never have seen them: free them now
                    try:
                        pool.destroy_pipe(handle)
                    except PoolError:
                        pass
            elif self.send is not None and self.receive is not None:
                abandon_pipes(pool, self.send, self.receive)
            self._pools.release(pool)
        for fd in (self.listen_fd, self.ring_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.listen_fd = self.ring_fd = -1
        if self.hub is not None:
            self.hub.close()
        if self.doorbell is not None:
            self.doorbell.close()
        if self.settled:  # the peer may attach already: the loss that follows is no error
            try:
                self.channel.post(Close())
            except ConnectionResetError:
                pass
        self.channel.close()


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
