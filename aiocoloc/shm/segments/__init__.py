"""Shared-memory segments: the mapped regions pools live in.

Three backends behind one small interface (``Segment``):

- ``MemfdSegment``: an anonymous memfd sealed against shrinking and growing,
  handed to peers over a Unix socket (SCM_RIGHTS).  The default between
  processes of one kernel: nothing is named in ``/dev/shm`` and the memory
  goes away with the last process that maps it, ``kill -9`` included.
- ``PosixShmSegment``: POSIX named shared memory (``/dev/shm/NAME``) for pools
  an operator provisions and for the host side of a QEMU ivshmem device.
- ``IvshmemSegment``: the guest side of ivshmem, BAR2 of PCI 1af4:1110.
"""

from __future__ import annotations

from aiocoloc.shm.segments.base import Segment
from aiocoloc.shm.segments.ivshmem import IvshmemSegment, find_ivshmem_devices
from aiocoloc.shm.segments.memfd import MemfdSegment, receive_segment, send_segment
from aiocoloc.shm.segments.posix import PosixShmSegment, UnlinkPolicy

__all__ = [
    "IvshmemSegment",
    "MemfdSegment",
    "PosixShmSegment",
    "Segment",
    "UnlinkPolicy",
    "find_ivshmem_devices",
    "receive_segment",
    "send_segment",
]
