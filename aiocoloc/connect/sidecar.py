"""The library's side of the discovery sidecar (``aiocoloc-discoveryd``).

Within one kernel and network namespace the host registry finds a peer's
control endpoint without any daemon.  Where it cannot (containers with
their own registry directories or namespaces, and VMs), a sidecar that
answers on its local API (``discovery.client``) knows which members are
co-located and which control endpoints they advertise:

- a client whose registry has no record for its peer asks the sidecar
  ``colocated(ip:port)`` (``lookup``); the endpoints the answer lists for
  that port become the records to ask, as the registry's would;
- a server advertises its control endpoint for each listening address
  (``Advertiser``), and advertises them again whenever the sidecar comes
  back after a restart (a subscription tells it the sidecar went away).

Nothing here is ever an error the application sees: a sidecar that is
absent, slow or restarting only means the registry alone is asked, and a
lookup is not tried again for ``RETRY_AFTER`` seconds after one failed.

An advertised endpoint is ``"<host>:<port>=<control>"`` (``[v6]:port`` for
IPv6; ``host`` may be a wildcard): short, as a Serf tag must be.  The
control is an abstract Unix socket (``@…``, within one kernel) or
``tcp:HOST:PORT`` (between kernels, ``*`` for the address the connection
reached; ``aiocoloc.connect.remote_handshake``).  A member on another node
is asked only through its TCP endpoints, through the pool the sidecar says
we share (``open_shared_pool`` maps it here too).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiocoloc.connect.colocation import local_pools
from aiocoloc.connect.registry import Record
from aiocoloc.shm import Pool
from aiocoloc.shm.named_pools import PoolOpenError, PoolSpec, open_pool

if TYPE_CHECKING:
    from discovery.client import SidecarClient

__all__ = [
    "LOOKUP_TIMEOUT",
    "RETRY_AFTER",
    "Advertiser",
    "SidecarAnswer",
    "endpoint_string",
    "lookup",
    "open_shared_pool",
    "parse_endpoint",
    "tcp_control_address",
    "tcp_control_string",
]

_log = logging.getLogger("aiocoloc.connect.sidecar")

#: Seconds a client's upgrade waits for the sidecar's answer.
LOOKUP_TIMEOUT = 0.25
#: Seconds the sidecar is not asked again after it did not answer.
RETRY_AFTER = 1.0
#: Seconds between a server's attempts to reach a sidecar that went away.
READVERTISE_EVERY = 0.5
_WILDCARDS = ("0.0.0.0", "::", "")

_down_until = 0.0


def endpoint_string(host: str, port: int, control: str) -> str:
    """What a server advertises for one listening address."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{address}={control}"


def parse_endpoint(text: str) -> tuple[str, int, str] | None:
    """``(host, port, control)`` of ``endpoint_string``'s output, else None
    (an endpoint of another kind, or garbage from a peer)."""
    address, sep, control = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not (sep and colon and port.isdigit() and control):
        return None
    if not (control.startswith(("@", "/")) or _tcp_control(control) is not None):
        return None
    return host.strip("[]"), int(port), control


def tcp_control_string(host: str | None, port: int) -> str:
    """A control endpoint between kernels: ``tcp:HOST:PORT``; ``*`` (host
    None or a wildcard) for "the address the client's connection reached"."""
    if host is None or host in _WILDCARDS:
        return f"tcp:*:{port}"
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def _tcp_control(control: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp:`` control endpoint, else None."""
    if not control.startswith("tcp:"):
        return None
    host, colon, port = control[4:].rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        return None
    return host.strip("[]"), int(port)


def tcp_control_address(control: str, reached: str) -> tuple[str, int] | None:
    """Where to connect for the ``tcp:`` control endpoint ``control`` of a
    server our connection reached at ``reached`` (its IP); None if
    ``control`` is not one."""
    parsed = _tcp_control(control)
    if parsed is None:
        return None
    host, port = parsed
    return (reached if host == "*" else host), port


@dataclass(frozen=True)
class SidecarAnswer:
    """What the sidecar said about a peer: ``records`` to ask (empty when
    none matches the port), or why there are none."""

    colocated: bool
    records: list[Record]
    detail: str
    pool: str | None = None  # the pool we share with the peer
    local: bool = True  # the peer is our own node (one kernel)


def _api_path() -> str:
    from discovery.client import default_api_path

    return str(default_api_path())


def _client(path: str, timeout: float) -> SidecarClient:
    from discovery.client import SidecarClient

    return SidecarClient(path, timeout=timeout)


async def lookup(host: str, port: int) -> SidecarAnswer | None:
    """Ask the sidecar about ``host:port``; None when no sidecar answers."""
    global _down_until
    if time.monotonic() < _down_until:
        return None
    path = _api_path()
    if not os.path.exists(path):
        return None  # no sidecar here: not even a connect
    from discovery.client import SidecarUnavailable

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        async with _client(path, LOOKUP_TIMEOUT) as client:
            answer = await client.colocated(address)
    except (SidecarUnavailable, OSError) as exc:
        _down_until = time.monotonic() + RETRY_AFTER
        _log.debug("no sidecar answer about %s: %s", address, exc)
        return None
    except Exception as exc:  # an error answer: as good as none
        _log.debug("the sidecar refused a lookup of %s: %s", address, exc)
        return None
    if not answer.colocated:
        where = answer.member.node if answer.member is not None else "no member"
        return SidecarAnswer(False, [], f"the sidecar says {address} ({where}) shares no pool")
    remote = not answer.local  # another kernel: only TCP control endpoints reach it
    records, unreachable = [], 0
    for text in answer.endpoints:
        parsed = parse_endpoint(text)
        if parsed is None:
            continue
        is_tcp = parsed[2].startswith("tcp:")
        pool = answer.pool if is_tcp else None
        record = Record(parsed[0], parsed[1], parsed[2], pool, 0, 0, os.getuid())
        if not record.matches(host, port):
            continue
        if is_tcp == remote:
            records.append(record)
        else:
            unreachable += 1
    node = answer.member.node if answer.member is not None else "?"
    if records:
        detail = f"co-located member {node}"
    elif unreachable and remote:
        detail = (
            f"co-located member {node} advertises no control endpoint another kernel can "
            "reach (its server holds no cluster key, $AIOCOLOC_KEY_FILE)"
        )
    else:
        detail = f"co-located member {node} advertises no server there"
    return SidecarAnswer(True, records, detail, answer.pool, answer.local)


async def open_shared_pool(pool_id: str) -> Pool | None:
    """A reference to the pool ``pool_id`` that the sidecar maps (a host pool
    shared across kernels), opened and joined by this process if it is not
    open yet; None when the sidecar does not map it or it cannot be opened
    (logged)."""
    pools = local_pools()
    taken = pools.take(pool_id)
    if taken is not None:
        return taken
    path = _api_path()
    from discovery.client import SidecarUnavailable

    try:
        async with _client(path, 2.0) as client:
            infos = await client.pools()
    except (SidecarUnavailable, OSError) as exc:
        _log.info("cannot ask the sidecar where pool %s is: %s", pool_id, exc)
        return None
    except Exception as exc:
        _log.info("the sidecar would not list its pools: %s", exc)
        return None
    found = [info for info in infos if info.id == pool_id]
    if not found:
        return None
    loop = asyncio.get_running_loop()
    if found[0].kind == "ivshmem":  # the sidecar may own the guest's doorbell device
        pool = await loop.run_in_executor(None, _pool_through_grant, path, pool_id)
        if pool is not None:
            return pools.adopt(pool)
    try:  # may wait on the pool's lock: not on the event loop
        mapped = await loop.run_in_executor(
            None, open_pool, PoolSpec.parse(found[0].name), "library"
        )
    except (PoolOpenError, ValueError, OSError) as exc:
        _log.warning("cannot map shared pool %s (%s): %s", pool_id, found[0].name, exc)
        return None
    if str(mapped.pool.id) != pool_id:  # changed under us (re-formatted)
        mapped.pool.close()
        return None
    return pools.adopt(mapped.pool)


def _pool_through_grant(api: str, pool_id: str) -> Pool | None:
    """The pool mapped through the doorbell device the sidecar grants us
    (``aiocoloc.notify.vfio_grants``), kept for its doorbells; None without a
    grant (the sysfs mapping and message doorbells serve then).  Blocking."""
    from aiocoloc.errors import PoolError, SegmentError
    from aiocoloc.notify import vfio_bells
    from aiocoloc.notify.vfio_grants import grants_path, request_grant

    bells = vfio_bells.bells_for(pool_id)
    if bells is None:
        grant = request_grant(grants_path(api), pool_id)
        if grant is None:
            return None
        try:
            bells = vfio_bells.register(pool_id, vfio_bells.VfioBells(grant))
        except (OSError, ValueError) as exc:
            grant.close()
            _log.warning("cannot use the doorbell device granted for pool %s: %s", pool_id, exc)
            return None
    try:
        pool = Pool.attach(bells.segment(), timeout=2.0)
    except (PoolError, SegmentError, OSError) as exc:
        _log.warning("cannot map pool %s through its doorbell device: %s", pool_id, exc)
        return None
    if str(pool.id) != pool_id:
        pool.close()
        return None
    _log.info(
        "pool %s mapped through its doorbell device (IVPosition %d)", pool_id, bells.position[0]
    )
    return pool


class Advertiser:
    """A loop's servers' endpoints, kept advertised to the sidecar.

    While a loop has endpoints and a sidecar's socket exists, one task
    advertises them all, then holds a subscription open to learn when the
    sidecar goes away, and advertises them again once it is back.  Without
    a socket, a timer looks for one every ``READVERTISE_EVERY`` seconds (no
    task, no connect)."""

    _by_loop: dict[asyncio.AbstractEventLoop, Advertiser] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._endpoints: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Advertiser:
        """The advertiser of ``loop`` (made on first use)."""
        for stale in [other for other in cls._by_loop if other.is_closed()]:
            del cls._by_loop[stale]
        advertiser = cls._by_loop.get(loop)
        if advertiser is None:
            advertiser = cls._by_loop[loop] = cls(loop)
        return advertiser

    def add(self, endpoints: list[str]) -> None:
        """Advertise ``endpoints`` (now if a sidecar answers, else when one does)."""
        self._endpoints.update(endpoints)
        self._wake.set()
        self._look()

    def _look(self) -> None:
        """Start advertising if a sidecar's socket exists, else look again later."""
        self._timer = None
        if not self._endpoints or self._loop.is_closed():
            return
        if self._task is not None and not self._task.done():
            return
        if os.path.exists(_api_path()):
            self._task = self._loop.create_task(self._keep())
        else:
            self._timer = self._loop.call_later(READVERTISE_EVERY, self._look)

    def remove(self, endpoints: list[str]) -> None:
        """Withdraw ``endpoints`` (best effort: the sidecar also withdraws a
        process's endpoints when it exits)."""
        gone = self._endpoints & set(endpoints)
        self._endpoints -= gone
        if not gone or self._loop.is_closed():
            return
        if not self._endpoints:
            if self._task is not None:
                self._task.cancel()
                self._task = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        path = _api_path()
        if os.path.exists(path):
            self._loop.create_task(self._withdraw(path, sorted(gone)))

    async def _withdraw(self, path: str, endpoints: list[str]) -> None:
        from discovery.client import SidecarUnavailable

        try:
            async with _client(path, 1.0) as client:
                await client.withdraw(endpoints)
        except (SidecarUnavailable, OSError) as exc:
            _log.debug("could not withdraw %s: %s", endpoints, exc)
        except Exception as exc:
            _log.debug("the sidecar refused to withdraw %s: %s", endpoints, exc)

    async def _keep(self) -> None:
        from discovery.client import SidecarUnavailable

        while self._endpoints:
            path = _api_path()
            if not os.path.exists(path):  # gone: the timer looks for a new one
                self._timer = self._loop.call_later(READVERTISE_EVERY, self._look)
                self._task = None
                return
            try:
                async with _client(path, 2.0) as client:
                    async with await client.subscribe() as feed:
                        await client.advertise(sorted(self._endpoints))
                        _log.debug("advertised %d endpoints to %s", len(self._endpoints), path)
                        self._wake.clear()
                        # Events are not ours to act on (yet): the feed only
                        # tells when the sidecar goes; new endpoints wake us.
                        await self._until_lost_or_woken(feed)
            except (SidecarUnavailable, OSError) as exc:
                _log.debug("no sidecar to advertise to (%s): retrying", exc)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), READVERTISE_EVERY)
                except TimeoutError:
                    pass
            except Exception as exc:  # an error answer: tell once, try again later
                _log.warning("the sidecar refused our endpoints: %s", exc)
                await asyncio.sleep(READVERTISE_EVERY * 10)

    async def _until_lost_or_woken(self, feed: object) -> None:
        async def drain() -> None:
            async for _ in feed:  # type: ignore[attr-defined]
                pass
            raise ConnectionResetError("the sidecar ended our subscription")

        lost = asyncio.ensure_future(drain())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((lost, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            lost.cancel()
        if lost.done() and not lost.cancelled():
            exc = lost.exception()
            if exc is not None:
                raise exc
