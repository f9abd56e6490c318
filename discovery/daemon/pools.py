"""The pools the sidecar maps: the set of them, watched for change.

A pool is named by a ``PoolSpec`` and opened by ``open_pool``
(``aiocoloc.shm.named_pools``, which the library uses too).  The sidecar
joins each pool it opens as a member --
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
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiocoloc.notify.vfio import IvshmemVfio
from aiocoloc.shm.named_pools import (
    MappedPool,
    PoolOpenError,
    PoolSpec,
    PoolSpecError,
    open_pool,
    probe_ivshmem,
)
from discovery.api_messages import ApiError, PoolInfo
from discovery.member import MAX_POOLS

__all__ = [
    "MappedPool",
    "PoolOpenError",
    "PoolSet",
    "PoolSpec",
    "PoolSpecError",
    "open_pool",
    "pool_info",
]

_log = logging.getLogger("discovery.daemon.pools")


def pool_info(mapped: MappedPool) -> PoolInfo:
    """What the local API says about a pool the sidecar maps."""
    pool = mapped.pool
    count = mapped.member_count()
    return PoolInfo(mapped.name, mapped.id, mapped.kind, pool.segment.size, count, mapped.source)


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
        return pool_info(mapped)

    async def detach(self, name: str) -> PoolInfo:
        """Unmap the pool ``name`` (as it was named, or its pool id)."""
        async with self._lock:
            mapped = self._find(name)
            if mapped is None:
                raise ApiError("not-found", f"no pool {name!r} is mapped")
            info = pool_info(mapped)
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
