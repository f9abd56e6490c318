"""Pools for the sidecar's tests: operator-provisioned POSIX pools and fake
ivshmem devices under a private sysfs root."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import posix_ipc

from aiocoloc.shm import IvshmemSegment, Pool, PoolConfig

#: Small pools: the sidecar only needs the member table.
SMALL = PoolConfig(slice_size=4096, max_members=16, max_pipes=4, max_slices_per_pipe=4, lease=1.0)
SIZE = 1 << 18


@contextlib.contextmanager
def posix_pool(lease: float = 1.0) -> Iterator[tuple[str, str]]:
    """A provisioned POSIX pool ``(name, pool id)``; removed afterwards."""
    name = f"aiocoloc-test-d{secrets.token_hex(5)}"
    pool = Pool.open_posix(name, SIZE, PoolConfig(**{**SMALL.__dict__, "lease": lease}))
    pool_id = str(pool.id)
    pool.close()  # the operator's tool leaves; the name stays
    try:
        yield name, pool_id
    finally:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + name)


def fake_ivshmem(sysfs_root: Path, address: str = "0000:00:04.0") -> tuple[Path, str]:
    """A PCI ivshmem device under ``sysfs_root`` whose BAR2 (a plain file)
    holds a fresh pool; returns ``(resource2 path, pool id)``."""
    device = sysfs_root / "bus" / "pci" / "devices" / address
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x1af4\n")
    (device / "device").write_text("0x1110\n")
    bar = device / "resource2"
    with bar.open("wb") as f:
        f.truncate(SIZE)
    segment = IvshmemSegment.open(sysfs_root=sysfs_root, address=address)
    pool = Pool.create(segment, SMALL)
    pool_id = str(pool.id)
    pool.close()
    return bar, pool_id
