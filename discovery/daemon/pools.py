"""The pools the sidecar maps: naming, opening, probing, watching for change.

A pool is named by a ``PoolSpec``: a POSIX shm name (an operator-provisioned
pool, the host side of ivshmem), an ivshmem device path (``…/resource2`` of
PCI 1af4:1110 inside a guest) or ``auto`` (every ivshmem device found under
the sysfs root).  The sidecar joins each pool it opens as a member --
heartbeating like any endpoint -- so co-located sidecars can watch each
other through it (``discovery.daemon.watch``) and its pool id is what it
advertises.

``PoolSet`` keeps them by pool id.  Opening and closing touch the pool's
lock and may wait, so they run in a worker thread; a pool leaves the set on
the loop's thread before it is closed, so nothing on the loop ever reads an
unmapped pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiocoloc.errors import PoolError, SegmentError, VfioUnavailable
from aiocoloc.notify.vfio import IvshmemVfio
from aiocoloc.shm import IvshmemSegment, Pool, PosixShmSegment, find_ivshmem_devices
from aiocoloc.shm.layout import HEADER_SIZE
from aiocoloc.shm.segments.base import Segment
from discovery.api_messages import ApiError, PoolInfo
from discovery.member import MAX_POOLS

__all__ = ["MappedPool", "PoolOpenError", "PoolSet", "PoolSpec", "PoolSpecError"]

_log = logging.getLogger("discovery.daemon.pools")

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
    """One pool the sidecar maps: how it was named and why."""

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

    def info(self) -> PoolInfo:
        try:
            members = len(self.pool.members())
        except PoolError:  # a broken member table: say so by a count of 0
            members = 0
        return PoolInfo(self.name, self.id, self.kind, self.pool.segment.size, members, self.source)

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


class PoolSet:
    """The pools mapped, by pool id; ``on_change()`` after any change."""

    def __init__(
        self, sysfs_root: Path, on_change: Callable[[], Awaitable[None]], *, vfio: bool = False
    ) -> None:
        self._sysfs_root = sysfs_root
        self._vfio = vfio
        self._on_change = on_change
        self._mapped: dict[str, MappedPool] = {}
        self._configured: list[PoolSpec] = []
        # Configured names the operator detached: a re-probe leaves them alone.
        self._detached: set[str] = set()
        self._lock = asyncio.Lock()

    def ids(self) -> frozenset[str]:
        return frozenset(self._mapped)

    def device(self, pool_id: str) -> IvshmemVfio | None:
        """The doorbell device of pool ``pool_id``, if we own it through VFIO."""
        mapped = self._mapped.get(pool_id)
        return mapped.device if mapped is not None else None

    def mapped(self) -> list[MappedPool]:
        return sorted(self._mapped.values(), key=lambda m: m.name)

    def _find(self, name: str) -> MappedPool | None:
        if name in self._mapped:
            return self._mapped[name]
        try:
            spec = PoolSpec.parse(name)
        except PoolSpecError:
            return None
        return next((m for m in self._mapped.values() if m.name == spec.text), None)

    async def open_configured(self, specs: tuple[PoolSpec, ...]) -> None:
        """Open the pools of the configuration; ``PoolOpenError`` (and
        nothing left mapped) if one named cannot be opened."""
        self._configured = list(specs)
        async with self._lock:
            try:
                for spec in specs:
                    if spec.kind == "auto":
                        for found in probe_ivshmem(self._sysfs_root):
                            await self._open(found, "auto", strict=False)
                    else:
                        await self._open(spec, "config", strict=True)
            except BaseException:
                await self._close_all()
                raise

    async def _open(self, spec: PoolSpec, source: str, *, strict: bool) -> MappedPool | None:
        if any(m.name == spec.text for m in self._mapped.values()):
            if strict:
                raise PoolOpenError(f"pool {spec.text} is mapped already", "conflict")
            return None
        if len(self._mapped) >= MAX_POOLS:
            raise PoolOpenError(
                f"pool {spec.text}: {MAX_POOLS} pools are mapped already (the most)", "limit"
            )
        mapped = await asyncio.to_thread(open_pool, spec, source, vfio=self._vfio)
        if mapped.id in self._mapped:
            await asyncio.to_thread(mapped.pool.close)
            other = self._mapped[mapped.id].name
            if strict:
                raise PoolOpenError(
                    f"pool {spec.text} is pool {mapped.id}, mapped already as {other}", "conflict"
                )
            return None
        self._mapped[mapped.id] = mapped
        return mapped

    async def attach(self, name: str) -> PoolInfo:
        """Map the pool ``name`` (the operator's migration hook)."""
        try:
            spec = PoolSpec.parse(name)
        except PoolSpecError as exc:
            raise ApiError("bad-request", str(exc)) from None
        if spec.kind == "auto":
            raise ApiError("bad-request", "name a pool; re-probing ('auto') is SIGHUP's job")
        async with self._lock:
            if self._find(spec.text) is not None:
                raise ApiError("conflict", f"pool {spec.text} is mapped already")
            try:
                mapped = await self._open(spec, "api", strict=True)
            except PoolOpenError as exc:
                raise ApiError(exc.code, str(exc)) from None
            assert mapped is not None
            self._detached.discard(spec.text)
        await self._on_change()
        return mapped.info()

    async def detach(self, name: str) -> PoolInfo:
        """Unmap the pool ``name`` (as it was named, or its pool id)."""
        async with self._lock:
            mapped = self._find(name)
            if mapped is None:
                raise ApiError("not-found", f"no pool {name!r} is mapped")
            info = mapped.info()
            await self._unmap(mapped)
            if any(spec.text == mapped.name for spec in self._configured):
                self._detached.add(mapped.name)
        await self._on_change()
        return info

    async def _unmap(self, mapped: MappedPool) -> None:
        # Out of the set first (the loop's thread), then closed in a thread.
        del self._mapped[mapped.id]
        await asyncio.to_thread(mapped.pool.close)
        if mapped.device is not None:  # (its grantees keep what they mapped)
            mapped.device.close()
        _log.info("unmapped pool %s (%s)", mapped.id, mapped.name)

    async def reprobe(self) -> bool:
        """Drop pools whose name went away, open configured ones now present
        (``auto``: new devices); True if the set changed."""
        changed = False
        async with self._lock:
            for mapped in list(self._mapped.values()):
                if not mapped.still_there():
                    _log.warning("pool %s: %s is gone; unmapping it", mapped.name, mapped.backing)
                    await self._unmap(mapped)
                    changed = True
            wanted: list[tuple[PoolSpec, str]] = []
            for spec in self._configured:
                if spec.kind == "auto":
                    wanted += [(found, "auto") for found in probe_ivshmem(self._sysfs_root)]
                else:
                    wanted.append((spec, "config"))
            for spec, source in wanted:
                if spec.text in self._detached or self._find(spec.text) is not None:
                    continue
                try:
                    changed |= await self._open(spec, source, strict=False) is not None
                except PoolOpenError as exc:
                    _log.warning("re-probe: %s", exc)
        if changed:
            await self._on_change()
        return changed

    async def close(self) -> None:
        """Leave every pool."""
        async with self._lock:
            await self._close_all()

    async def _close_all(self) -> None:
        for mapped in list(self._mapped.values()):
            await self._unmap(mapped)
