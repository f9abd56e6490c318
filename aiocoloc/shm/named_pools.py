"""Pools named by an operator, and opening them: a POSIX shm name (a pool
provisioned on the host, the host side of ivshmem), an ivshmem device path
(``…/resource2`` of PCI 1af4:1110 inside a guest), or ``auto`` (every
ivshmem device found under the sysfs root).

The sidecar maps the pools it advertises with these (``discovery.daemon.pools``),
and the library maps the one a sidecar lists when a connection between
kernels needs it (``aiocoloc.connect.sidecar``).  Opening joins the pool as a
member and may wait on its lock: call it off the event loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiocoloc.errors import PoolError, SegmentError, VfioUnavailable
from aiocoloc.notify.vfio import IvshmemVfio
from aiocoloc.shm.layout import HEADER_SIZE
from aiocoloc.shm.pool import Pool
from aiocoloc.shm.segments import IvshmemSegment, PosixShmSegment, find_ivshmem_devices
from aiocoloc.shm.segments.base import Segment

__all__ = [
    "ATTACH_TIMEOUT",
    "MappedPool",
    "PoolOpenError",
    "PoolSpec",
    "PoolSpecError",
    "open_pool",
    "probe_ivshmem",
]

_log = logging.getLogger("aiocoloc.shm.named_pools")

#: Seconds to wait for a pool's creator to finish formatting it.
ATTACH_TIMEOUT = 2.0
SHM_DIR = Path("/dev/shm")
PoolKind = Literal["posix", "ivshmem", "auto"]


class PoolSpecError(ValueError):
    """A pool spec that cannot name a pool."""


class PoolOpenError(RuntimeError):
    """A pool that is named well but cannot be opened (absent, not a pool, ...);
    ``code`` is the API error code it becomes."""

    def __init__(self, message: str, code: str = "not-found") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PoolSpec:
    """How a pool is named: ``kind`` and ``text`` (the shm name without its
    leading slash, or the device path)."""

    kind: PoolKind
    text: str

    @classmethod
    def parse(cls, text: str) -> PoolSpec:
        text = text.strip()
        if not text or "\0" in text:
            raise PoolSpecError(f"{text!r} names no pool")
        if text == "auto":
            return cls("auto", text)
        if "/" in text.lstrip("/"):
            return cls("ivshmem", text)
        name = text.lstrip("/")
        if not name or len(name) > 250:
            raise PoolSpecError(f"{text!r}: a POSIX shm name is 1 to 250 characters")
        return cls("posix", name)


@dataclass
class MappedPool:
    """One pool opened by its name: how it was named and why (``source``)."""

    name: str
    kind: str
    source: str  # "config", "auto" or "api"
    pool: Pool
    backing: Path  # the file whose disappearance unmaps it (re-probe)
    inode: tuple[int, int]
    device: IvshmemVfio | None = None  # owned through VFIO (``--doorbells vfio``)

    @property
    def id(self) -> str:
        return str(self.pool.id)

    def member_count(self) -> int:
        """Members joined now; 0 when the member table cannot be read."""
        try:
            return len(self.pool.members())
        except PoolError:  # a broken member table: say so by a count of 0
            return 0

    def still_there(self) -> bool:
        """Whether the name still leads to the memory we map."""
        try:
            st = os.stat(self.backing)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.inode


def _ivshmem_device(path: Path) -> tuple[Path, str]:
    """``(sysfs root, PCI address)`` of ``…/bus/pci/devices/<bdf>[/resource2]``."""
    device = path.parent if path.name == "resource2" else path
    parts = device.parts
    if len(parts) < 5 or parts[-4:-1] != ("bus", "pci", "devices"):
        raise PoolOpenError(
            f"{path}: not an ivshmem device path (expected …/bus/pci/devices/<address>/resource2)"
        )
    return Path(*parts[:-4]), device.name


def _attach(segment: Segment) -> Pool:
    try:
        return Pool.attach(segment, timeout=ATTACH_TIMEOUT)
    except BaseException:
        segment.close()
        raise


def open_pool(spec: PoolSpec, source: str, *, vfio: bool = False) -> MappedPool:
    """Open and join the pool ``spec`` names (not ``auto``); blocking.
    ``PoolOpenError`` with a message for the operator when it cannot.
    ``vfio``: an ivshmem device is opened through VFIO, so that its doorbell
    interrupts can be granted to local processes (``aiocoloc.notify.vfio_grants``);
    one that VFIO cannot open is mapped through sysfs, with a warning."""
    if vfio and spec.kind == "ivshmem":
        mapped = _open_through_vfio(spec, source)
        if mapped is not None:
            return mapped
    try:
        if spec.kind == "posix":
            posix = PosixShmSegment.attach(spec.text, min_size=HEADER_SIZE)
            backing = SHM_DIR / spec.text
            inode = os.fstat(posix.fd)
            pool = _attach(posix)
        else:
            root, address = _ivshmem_device(Path(spec.text))
            device = IvshmemSegment.open(sysfs_root=root, address=address)
            backing = device.device / "resource2"
            inode = os.fstat(device.fd)
            pool = _attach(device)
    except SegmentError as exc:
        raise PoolOpenError(f"pool {spec.text}: {exc}") from None
    except PoolError as exc:  # not a pool, another layout version, no free slot
        raise PoolOpenError(f"pool {spec.text}: {exc}", "failed") from None
    _log.info("mapped pool %s (%s) from %s", pool.id, spec.kind, spec.text)
    return MappedPool(spec.text, spec.kind, source, pool, backing, (inode.st_dev, inode.st_ino))


def _open_through_vfio(spec: PoolSpec, source: str) -> MappedPool | None:
    root, address = _ivshmem_device(Path(spec.text))
    try:
        device = IvshmemVfio.open(sysfs_root=root, address=address)
    except (VfioUnavailable, OSError) as exc:
        _log.warning(
            "pool %s: no doorbells through VFIO (%s); mapping it through sysfs", spec.text, exc
        )
        return None
    try:
        pool = _attach(device.segment())
    except (PoolError, SegmentError) as exc:
        device.close()
        raise PoolOpenError(f"pool {spec.text}: {exc}", "failed") from None
    except BaseException:
        device.close()
        raise
    backing = root / "bus" / "pci" / "devices" / address / "resource2"
    st = os.stat(backing)
    _log.info(
        "mapped pool %s through VFIO from %s (IVPosition %d, %d doorbell vectors)",
        pool.id,
        address,
        device.position,
        device.vectors,
    )
    return MappedPool(spec.text, spec.kind, source, pool, backing, (st.st_dev, st.st_ino), device)


def probe_ivshmem(sysfs_root: Path) -> list[PoolSpec]:
    """Every ivshmem device under ``sysfs_root``, as specs of their BAR2."""
    found = [PoolSpec("ivshmem", str(d / "resource2")) for d in find_ivshmem_devices(sysfs_root)]
    if not found:
        _log.info(
            "auto: no ivshmem device (PCI 1af4:1110) under %s", sysfs_root / "bus/pci/devices"
        )
    return found
