"""Recording a sidecar's event stream in a test, with arrival times."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from discovery.client import EventFeed, SidecarClient
from discovery.events import Event


class Recorder:
    """Every event of one subscription, with ``time.monotonic()`` of arrival."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []
        self._feed: EventFeed | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def start(cls, client: SidecarClient) -> Recorder:
        recorder = cls()
        recorder._feed = await client.subscribe()
        recorder._task = asyncio.get_running_loop().create_task(recorder._run())
        return recorder

    async def _run(self) -> None:
        assert self._feed is not None
        async for event in self._feed:
            self.events.append((time.monotonic(), event))
            self._changed.set()

    async def wait(
        self, predicate: Callable[[Event], bool], timeout: float, what: str
    ) -> tuple[float, Event]:
        """The first event (so far or to come) ``predicate`` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            for arrived, event in self.events:
                if predicate(event):
                    return arrived, event
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [(e.kind, e.member.node) for _, e in self.events]
                raise AssertionError(f"no {what} within {timeout} s; saw {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def kinds(self, node: str) -> list[str]:
        return [e.kind for _, e in self.events if e.member.node == node]

    async def close(self) -> None:
        if self._feed is not None:
            await self._feed.aclose()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
