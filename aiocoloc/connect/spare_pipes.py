"""Pipes made ahead: a resting hub keeps its next connection's pipes.

Between a client's ``hello`` and its answer, a server spends most of its
time creating the connection's two pipes and writing its nonce (60-80 us
on a loop that just woke up).  A hub rests after its last connection
closed, keeping its eventfds for the next one (``aiocoloc.notify.hub``);
when its client had proved a pool over it (``aiocoloc.connect.handshake``),
that next connection needs exactly such a pair: the same pool, the same
client slot.  So when the hub starts resting, the server makes that pair
(a ``SparePipes``, at most one per hub, kept as ``Hub.spare``), and the next
``hello`` that skips the proof takes it instead of making its own -- made
while the client closes and connects again, not while it waits.

- A pair is made only while the pool is at most half full, so pipes made
  ahead hold at most about half a pool, each pair for at most its hub's
  linger (``hub_linger``); a server whose pools fill opens another.
- On take, both pipes must still be active (the client's slot may have
  been reclaimed meanwhile, which closes its pipes); otherwise the pair
  is given back and the handshake makes its own.
- The pair holds a reference on its pool and is given back (both pipes
  destroyed, the reference dropped) when its hub closes: after resting,
  or with its endpoint.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from aiocoloc.connect.colocation import LocalPools
from aiocoloc.connect.handshake_steps import new_pipe, write_nonce
from aiocoloc.control.messages import NONCE_SIZE
from aiocoloc.errors import HandshakeFailed, PoolError, RingError
from aiocoloc.notify.hub import Hub
from aiocoloc.shm import PipeHandle, Pool

__all__ = ["SparePipes", "make_spare", "take_spare"]

_log = logging.getLogger("aiocoloc.connect.spare_pipes")


@dataclass
class SparePipes:
    """A connection's pipes made ahead, with the nonce already written."""

    pools: LocalPools
    pool: Pool  # a reference held on it
    client: int  # the client's member slot
    receive: PipeHandle  # client -> server
    send: PipeHandle  # server -> client, holding ``nonce``
    nonce: bytes

    def discard(self) -> None:
        """Destroy both pipes and drop the reference on the pool."""
        for handle in (self.receive, self.send):
            try:
                self.pool.destroy_pipe(handle)
            except PoolError:
                pass  # gone with the pool or the client's slot
        self.pools.release(self.pool)


def make_spare(pools: LocalPools, pool: Pool, client: int, hub: Hub) -> None:
    """Make the next pair of pipes for ``client`` in ``pool`` over ``hub``,
    unless the hub has one, is closed or busy again, or the pool is more
    than half full."""
    if hub.closed or hub.members or hub.spare is not None or pool.closed:
        return
    if 2 * pool.free_slice_count() < pool.geometry.slice_count:
        return
    held = pools.take(str(pool.id))
    if held is not pool:  # (no longer ours to use)
        if held is not None:
            pools.release(held)
        return
    made: list[PipeHandle] = []
    try:
        made.append(new_pipe(pool, client, pool.slot))
        made.append(new_pipe(pool, pool.slot, client))
        nonce = secrets.token_bytes(NONCE_SIZE)
        write_nonce(pool, made[1], nonce)
    except (HandshakeFailed, PoolError, RingError, ValueError) as exc:
        _log.debug("no pipes made ahead for hub %s: %s", hub.token[:8], exc)
        for handle in made:
            try:
                pool.destroy_pipe(handle)
            except PoolError:
                pass
        pools.release(pool)
        return
    hub.spare = SparePipes(pools, pool, client, made[0], made[1], nonce)


def take_spare(hub: Hub, pool_id: str, client: int) -> SparePipes | None:
    """The hub's pair for ``client`` in pool ``pool_id`` (the caller owns it
    from now on), if it has one whose pipes are still active."""
    spare = hub.spare
    if not isinstance(spare, SparePipes):
        return None
    if str(spare.pool.id) != pool_id or spare.client != client:
        return None
    hub.spare = None
    pool = spare.pool
    if pool.closed or not (pool.has_pipe(spare.receive) and pool.has_pipe(spare.send)):
        spare.discard()
        return None
    return spare
