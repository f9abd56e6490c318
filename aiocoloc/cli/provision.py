"""``aiocoloc pools create``: the operator formats a host's pool.

A pool that VMs share is a POSIX shared memory name on the host
(``/dev/shm/NAME``) that QEMU maps into each guest as an ivshmem device.
It must exist, formatted, before the guests boot (QEMU refuses a file
smaller than the device and a size that is not a power of two), and it
outlives every process: this command creates it, or finds it formatted
already, and leaves it in place.
"""

from __future__ import annotations

import os
import re

from aiocoloc.errors import PoolError, SegmentError
from aiocoloc.shm import Pool, PoolConfig

__all__ = [
    "HOST_POOL_LEASE",
    "HOST_POOL_PIPES",
    "ProvisionError",
    "create_for_cli",
    "create_host_pool",
    "parse_size",
]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
#: Pipes a host pool has room for: two per connection, 512 connections.
HOST_POOL_PIPES = 1024
#: Seconds a member's heartbeat may stall before it is reaped: VMs on a busy
#: host, or paused for a moment, stall longer than processes do.
HOST_POOL_LEASE = 15.0


def parse_size(text: str) -> int:
    """``"64M"``, ``"1G"``, ``"4194304"`` as bytes; ``ValueError`` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 64M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def create_host_pool(
    name: str,
    size: int,
    *,
    slice_size: int = 64 * 1024,
    group: str | None = None,
    lease: float = HOST_POOL_LEASE,
) -> tuple[str, bool]:
    """Create and format the host pool ``name`` of ``size`` bytes (a power of
    two, as ivshmem needs), or attach to it if it exists; returns its pool
    id and whether it was created.  ``PoolError``/``SegmentError``/
    ``ValueError`` say what is wrong."""
    if size <= 0 or size & (size - 1):
        raise ValueError(f"size {size} is not a power of two (QEMU's ivshmem needs one)")
    if slice_size <= 0 or slice_size & (slice_size - 1) or slice_size >= size:
        raise ValueError(f"slice size {slice_size} must be a power of two below the pool size")
    existed = os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))
    if not 0.5 <= lease <= 3600:
        raise ValueError(f"lease {lease} s is outside 0.5 to 3600 s")
    config = PoolConfig(slice_size=slice_size, max_pipes=HOST_POOL_PIPES, lease=lease)
    pool = Pool.open_posix(name, size, config, group=group)
    try:
        return str(pool.id), not existed
    finally:
        pool.close()


class ProvisionError(Exception):
    """Wraps what stops a pool from being created, for the CLI."""


def create_for_cli(
    name: str, size_text: str, slice_text: str, group: str | None, lease: float
) -> str:
    """``create_host_pool`` with the CLI's arguments; one line for the operator."""
    try:
        size, slice_size = parse_size(size_text), parse_size(slice_text)
        pool_id, created = create_host_pool(
            name, size, slice_size=slice_size, group=group, lease=lease
        )
    except (ValueError, PoolError, SegmentError) as exc:
        raise ProvisionError(f"pool {name}: {exc}") from None
    state = "created" if created else "already formatted"
    return f"{name}: pool {pool_id} ({state}, {size} bytes in /dev/shm/{name.lstrip('/')})"
