"""One cluster of ``bench/discovery.py``: N daemons of one engine, a view
of each one's API, and when those views come to agree on something."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from bench._sidecars import SidecarProcess
from bench._sidecars_fleet import Fleet
from bench._sidecars_view import ApiView

__all__ = ["TIMEOUT", "Agreement", "Cluster", "Progress", "Value", "agreement"]

TIMEOUT = "timeout"
Progress = Callable[[str], None]
Value = float | str  # seconds, or TIMEOUT


@dataclass
class Cluster:
    """N daemons of one engine, and a view of each one's API."""

    fleet: Fleet
    engine: str
    size: int
    profile: str
    progress: Progress
    ips: list[str] = field(default_factory=list)
    sidecars: list[SidecarProcess] = field(default_factory=list)
    views: dict[str, ApiView] = field(default_factory=dict)  # node -> view of the live ones
    #: Every view made, those of members gone since too (false failures).
    all_views: list[ApiView] = field(default_factory=list)
    #: node -> monotonic time it was killed (its failed events after it are right).
    killed: dict[str, float] = field(default_factory=dict)

    def node(self, index: int) -> str:
        return f"{self.engine[0]}{self.size:02d}-{index:02d}"

    @property
    def seed(self) -> str:
        return self.sidecars[0].address

    async def spawn(self, index: int) -> SidecarProcess:
        sidecar = await self.fleet.start(
            self.node(index),
            self.ips[index],
            engine=self.engine,
            profile=self.profile,
            join=self.seed if index else None,
        )
        self.sidecars.append(sidecar)
        return sidecar

    async def watch(self, sidecar: SidecarProcess) -> ApiView:
        view = ApiView(sidecar)
        await view.start()
        self.views[sidecar.node] = view
        self.all_views.append(view)
        return view

    async def drop(self, sidecar: SidecarProcess) -> None:
        view = self.views.pop(sidecar.node, None)
        if view is not None:
            await view.close()

    def live(self) -> list[SidecarProcess]:
        return [s for s in self.sidecars if s.node in self.views]

    def live_views(self) -> list[ApiView]:
        return list(self.views.values())

    async def close(self) -> None:
        for view in list(self.views.values()):
            await view.close()
        self.views.clear()
        await self.fleet.stop(self.sidecars)


@dataclass(frozen=True)
class Agreement:
    """When each view first satisfied a predicate, within a timeout."""

    times: list[float]
    #: Nodes of the views that had not by the timeout.
    missing: list[str]

    @property
    def seen(self) -> str:
        return f"{len(self.times)}/{len(self.times) + len(self.missing)}"

    def since(self, start: float) -> Value:
        """Seconds from ``start`` until the last view did (or TIMEOUT)."""
        return TIMEOUT if self.missing or not self.times else max(self.times) - start


async def agreement(
    views: list[ApiView], predicate: Callable[[ApiView], bool], timeout: float
) -> Agreement:
    """Until every view satisfies ``predicate``, or ``timeout`` seconds."""
    futures = [view.when(predicate) for view in views]
    if futures:
        await asyncio.wait(futures, timeout=timeout)
    times, missing = [], []
    for view, future in zip(views, futures, strict=True):
        if future.done() and not future.cancelled():
            times.append(future.result())
        else:
            future.cancel()
            missing.append(view.sidecar.node)
    return Agreement(times, missing)
