"""The shared-memory layer: segments, pools, and the pipes carved from them.

This package owns everything that lives in a pool's mapping except the bytes
of the pipes themselves (those are the ring's, ``aiocoloc/_ring.pxd``):

- ``segments``: where the memory comes from (memfd, POSIX shm, ivshmem);
- ``layout``: the pool's shared layout -- header, member table, pipe table,
  slice table -- and formatting and validating it (the one place it is
  defined);
- ``members``: the member table and this process's membership -- joining
  and leaving, heartbeats, leases, reaping;
- ``lock``: the allocator lock and the take-over of a dead holder;
- ``staleness``: "unchanged by my own clock since", which leases and
  take-overs are judged by (no shared clock across VMs);
- ``pipes``: the pipe and slice tables -- pipes, their slices, their demand;
- ``pool``: ``Pool``, this process's membership of one pool, composing them;
- ``atomic``: atomic words in shared memory, compiled or pure Python.
"""

from __future__ import annotations

from aiocoloc.shm.layout import POOL_MAGIC, POOL_VERSION, PoolConfig, PoolGeometry
from aiocoloc.shm.pipes import PipeHandle, PipeInfo
from aiocoloc.shm.pool import Pool
from aiocoloc.shm.segments import (
    IvshmemSegment,
    MemfdSegment,
    PosixShmSegment,
    Segment,
    UnlinkPolicy,
    find_ivshmem_devices,
    receive_segment,
    send_segment,
)

__all__ = [
    "POOL_MAGIC",
    "POOL_VERSION",
    "IvshmemSegment",
    "MemfdSegment",
    "PipeHandle",
    "PipeInfo",
    "Pool",
    "PoolConfig",
    "PoolGeometry",
    "PosixShmSegment",
    "Segment",
    "UnlinkPolicy",
    "find_ivshmem_devices",
    "receive_segment",
    "send_segment",
]
