"""What waits for a connection's traffic: the upgrade's hook, and the loop
watch that keeps the event loop turning while an upgrade is on its way.

``write(); await drain()`` never yields while the transport is not paused,
so a bulk writer can starve the loop for good, and the handshake with it.
While watched, the transport's traffic paths look every few KiB whether
the loop ran since the last look (a marker callback); a writer that kept
it from running for a whole period gets one ``pause_writing`` and, on the
next loop iteration, ``resume_writing``: its ``drain()`` yields once.

Nothing is added to the traffic paths: the transport keeps the goal this
object returns in its ``_traffic_goal`` and calls ``reached`` once its
bytes moved reach it, a test that its data paths make anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable

__all__ = ["NO_TRAFFIC_GOAL", "WATCH_STEP_MAX", "WATCH_STEP_MIN", "LoopWatch"]

#: A goal when nothing waits: more bytes than a connection moves.
NO_TRAFFIC_GOAL = 1 << 62
#: While watched, look at the loop every so many bytes of traffic: adapted
#: between these bounds so that looks come about four per watch period,
#: whatever the write size.
WATCH_STEP_MIN = 4 * 1024
WATCH_STEP_MAX = 1 << 20


class LoopWatch:
    """One connection's traffic hook and loop watch.  Each method returns
    the traffic (bytes written and received) at which to call ``reached``."""

    # Starting values on the class, and no __init__: a server watches every
    # connection it accepts, and most are short.
    _hook_goal = NO_TRAFFIC_GOAL
    _callback: Callable[[], None] | None = None
    _hook_period: float | None = None  # watch() from the hook on
    _period_ns = 0  # 0: not watched; else how long a writer may starve the loop
    _look_goal = NO_TRAFFIC_GOAL  # traffic at which to look next
    _step = WATCH_STEP_MIN
    _looked = 0  # monotonic ns of the last look
    _since = 0  # monotonic ns when the pending marker was queued
    _marker: asyncio.Handle | None = None  # runs when the loop turns

    def call_after(self, nbytes: int, callback: Callable[[], None], period: float | None) -> int:
        """Call ``callback`` once ``nbytes`` moved; then watch with ``period``."""
        self._hook_goal, self._callback, self._hook_period = nbytes, callback, period
        return min(nbytes, self._look_goal)

    def watch(self, period: float, moved: int) -> int:
        """Keep the loop turning: a writer may starve it ``period`` seconds."""
        self._period_ns = max(int(period * 1e9), 1)
        if self._look_goal == NO_TRAFFIC_GOAL:
            # Nothing else until the first look: most connections are short.
            self._looked = 0
            self._look_goal = moved + self._step
        return min(self._hook_goal, self._look_goal)

    def stop_watching(self) -> int:
        """Stop watching the loop (the hook stays)."""
        self._period_ns, self._look_goal = 0, NO_TRAFFIC_GOAL
        if self._marker is not None:
            self._marker.cancel()
            self._marker = None
        return self._hook_goal

    def reached(
        self,
        moved: int,
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context,
        nudge: Callable[[], None],
    ) -> int:
        """``moved`` bytes moved, at or past the goal: run the hook (soon, in
        ``context``), look at the loop; ``nudge()`` pauses the writer for one
        loop iteration."""
        callback = self._callback
        if callback is not None and moved >= self._hook_goal:
            self._hook_goal, self._callback = NO_TRAFFIC_GOAL, None
            if self._hook_period is not None:
                self.watch(self._hook_period, moved)
            loop.call_soon(callback, context=context)
        if moved >= self._look_goal:
            self._look(moved, loop, nudge)
        return min(self._hook_goal, self._look_goal)

    def _loop_turned(self) -> None:
        self._marker = None

    def _look(self, moved: int, loop: asyncio.AbstractEventLoop, nudge: Callable[[], None]) -> None:
        now = time.monotonic_ns()
        period = self._period_ns
        if self._marker is None:  # the loop ran since the last look (or first look)
            self._since = now
            self._marker = loop.call_soon(self._loop_turned)
        elif now - self._since >= period:  # starved for a whole period
            nudge()
            self._since = now
        # Look about four times a period: the step follows the write rate.
        if self._looked:
            elapsed = now - self._looked
            if elapsed < period // 8 and self._step < WATCH_STEP_MAX:
                self._step *= 2
            elif elapsed > period // 2 and self._step > WATCH_STEP_MIN:
                self._step //= 2
        self._looked = now
        self._look_goal = moved + self._step
