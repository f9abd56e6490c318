"""One daemon's membership as ``bench/discovery.py`` sees it through the
daemon's local API (``ApiView``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench._sidecars import SidecarProcess
from discovery.client import SidecarClient, SidecarUnavailable
from discovery.events import Event

__all__ = ["ApiView"]


class ApiView:
    """One daemon's membership as its API reports it: a snapshot of
    ``members()``, kept current from a subscription, every change stamped
    (``time.monotonic()``) when it arrived."""

    def __init__(self, sidecar: SidecarProcess) -> None:
        self.sidecar = sidecar
        self.status: dict[str, str] = {}
        #: Every event that arrived: (time, kind, node).
        self.events: list[tuple[float, str, str]] = []
        self.gone = False
        self._client = SidecarClient(sidecar.api, timeout=5.0)
        self._waiters: list[tuple[Callable[[ApiView], bool], asyncio.Future[float]]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        feed = await self._client.subscribe()
        await self._snapshot()
        self._task = asyncio.get_running_loop().create_task(self._follow(feed))

    async def _snapshot(self) -> None:
        for view in await self._client.members():
            self.status[view.member.node] = view.member.status.value
        self._check()

    async def _follow(self, feed: Any) -> None:
        try:
            async with feed:
                async for event in feed:
                    await self._apply(event)
        except SidecarUnavailable:
            pass
        finally:
            self.gone = True

    async def _apply(self, event: Event) -> None:
        now = time.monotonic()
        node = event.member.node
        self.events.append((now, event.kind, node))
        if event.kind == "resync":
            await self._snapshot()
            return
        if event.kind == "leave":
            self.status[node] = "left"
        elif event.kind == "failed":
            self.status[node] = "failed"
        else:
            self.status[node] = event.member.status.value
        self._check(now)

    def _check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        waiting = []
        for predicate, future in self._waiters:
            if future.done():
                continue
            if predicate(self):
                future.set_result(now)
            else:
                waiting.append((predicate, future))
        self._waiters = waiting

    def when(self, predicate: Callable[[ApiView], bool]) -> asyncio.Future[float]:
        """A future of the time ``predicate(self)`` first holds (now, if it
        holds already)."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        self._check()
        return future

    @staticmethod
    def sees(node: str, *statuses: str) -> Callable[[ApiView], bool]:
        """A predicate for ``when``: the view has ``node`` in one of ``statuses``."""
        return lambda view: view.status.get(node) in statuses

    @staticmethod
    def sees_alive(nodes: Iterable[str]) -> Callable[[ApiView], bool]:
        """A predicate for ``when``: the view has all ``nodes`` alive."""
        wanted = frozenset(nodes)
        return lambda view: view.alive() >= wanted

    def alive(self) -> set[str]:
        """Members alive (or only suspected) for this daemon."""
        return {node for node, status in self.status.items() if status in ("alive", "suspect")}

    def failed_events(self, since: float) -> list[str]:
        """Nodes of the ``failed`` events that arrived after ``since``."""
        return [node for t, kind, node in self.events if kind == "failed" and t >= since]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.close()
        for _, future in self._waiters:
            future.cancel()
