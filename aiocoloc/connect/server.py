"""The ``Server`` that ``aiocoloc.create_server``/``start_server`` return: the
loop's own server, plus the control endpoint and registry records that let
co-located clients upgrade."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.endpoint import ControlEndpoint
from aiocoloc.connect.registry import Registry
from aiocoloc.connect.sidecar import Advertiser

__all__ = ["Server"]


class Server(asyncio.AbstractServer):
    """What ``create_server`` returns: the loop's server, plus the control
    endpoint and registry records that let clients upgrade."""

    #: Servers not closed yet.  The loop keeps its own server alive while it
    #: serves, whether or not the caller keeps it (asyncio's and uvloop's
    #: both); ours must live as long, or its records and pool would go.
    _serving: set[Server] = set()

    def __init__(
        self,
        inner: asyncio.AbstractServer,
        endpoint: ControlEndpoint | None,
        records: Iterable[Any],
        registry: Registry | None,
        pool: Any = None,
        advertised: Iterable[str] = (),
    ) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._records = list(records)
        self._registry = registry
        self._pool = pool
        self._advertised = list(advertised)  # to the discovery sidecar
        # (Those of loops closed since without closing them go now.)
        Server._serving = {s for s in Server._serving if not s.get_loop().is_closed()}
        Server._serving.add(self)

    @property
    def control_address(self) -> str | None:
        """The control endpoint clients upgrade through (None: upgrades off)."""
        return self._endpoint.address if self._endpoint is not None else None

    def close(self) -> None:
        if self._registry is not None:
            for path in self._records:
                self._registry.withdraw(path)
            self._records.clear()
        if self._advertised:
            Advertiser.of(self.get_loop()).remove(self._advertised)
            self._advertised.clear()
        if self._endpoint is not None:
            self._endpoint.close()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            local_pools().release(pool)
        self._inner.close()
        Server._serving.discard(self)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._inner.get_loop()

    def is_serving(self) -> bool:
        return self._inner.is_serving()

    async def start_serving(self) -> None:
        await self._inner.start_serving()

    async def serve_forever(self) -> None:
        try:
            await self._inner.serve_forever()
        finally:
            self.close()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self._inner.sockets)  # type: ignore[attr-defined]

    def close_clients(self) -> None:
        self._inner.close_clients()  # type: ignore[attr-defined]

    def abort_clients(self) -> None:
        self._inner.abort_clients()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<aiocoloc.Server sockets={self.sockets!r} control={self.control_address}>"
