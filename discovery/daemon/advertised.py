"""Control endpoints that local servers advertise through the API.

Each endpoint belongs to the process that advertised it last (its pid, from
``SO_PEERCRED``); when that process exits the endpoint is withdrawn by
itself (``pidfd_open``), so a server that dies without withdrawing never
leaves peers trying a dead endpoint.  An endpoint advertised by a process
the daemon cannot see (another pid namespace: pid 0) stays until withdrawn.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from discovery.api_messages import ApiError

__all__ = ["AdvertisedEndpoints"]

_log = logging.getLogger("discovery.daemon.advertised")


class AdvertisedEndpoints:
    """Endpoints by owner; ``on_change()`` after every change.  ``room`` is
    how many endpoints the member record carries in all."""

    def __init__(self, room: int, on_change: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._room = room
        self._on_change = on_change
        self._owner: dict[str, int] = {}  # endpoint -> pid (insertion order kept)
        self._pidfds: dict[int, int] = {}  # pid -> pidfd watched for its exit
        self._tasks: set[asyncio.Task[None]] = set()

    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._owner)

    async def advertise(self, endpoints: Sequence[str], pid: int) -> list[str]:
        """Add ``endpoints`` (owned by ``pid`` from now on)."""
        new = [e for e in dict.fromkeys(endpoints) if e not in self._owner]
        if len(self._owner) + len(new) > self._room:
            raise ApiError(
                "limit",
                f"a member record carries {self._room} control endpoints; "
                f"{len(self._owner)} are advertised",
            )
        for endpoint in endpoints:
            self._owner[endpoint] = pid
        self._watch(pid)
        if new:
            await self._on_change()
        return list(self._owner)

    async def withdraw(self, endpoints: Sequence[str]) -> list[str]:
        """Remove ``endpoints`` (whoever advertised them)."""
        gone = [e for e in endpoints if self._owner.pop(e, None) is not None]
        self._unwatch_unused()
        if gone:
            await self._on_change()
        return list(self._owner)

    def _watch(self, pid: int) -> None:
        if pid <= 0 or pid in self._pidfds:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:  # gone already, or no pidfd here: kept until withdrawn
            _log.debug("cannot watch advertiser pid %d: %s", pid, exc)
            return
        self._pidfds[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, pid)

    def _exited(self, pid: int) -> None:
        gone = [e for e, owner in self._owner.items() if owner == pid]
        for endpoint in gone:
            del self._owner[endpoint]
        self._unwatch_unused()
        if gone:
            _log.info("process %d exited: withdrawing its endpoints %s", pid, gone)
            task = asyncio.get_running_loop().create_task(self._on_change())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _unwatch_unused(self) -> None:
        owners = set(self._owner.values())
        for pid in [p for p in self._pidfds if p not in owners]:
            fd = self._pidfds.pop(pid)
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        """Stop watching owners."""
        self._owner.clear()
        self._unwatch_unused()
