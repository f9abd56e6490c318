"""The sidecar: an engine, the pools it maps, the pool watch and the local
API, started and stopped in the order that keeps peers' views right.

Start: key file, API socket (refusing a second daemon before touching the
network), pools, engine, then joining (retried in the background until a
seed answers), the pool watch, serving the API.  Stop: stop serving, leave
gossip (peers see ``leave``), then leave the pools (so their pool watch sees
a clean exit, not a death), then release the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiocoloc.notify.vfio_grants import GrantServer, grants_path
from discovery.api_messages import API_VERSION, ApiError, Request
from discovery.daemon.advertised import AdvertisedEndpoints
from discovery.daemon.api import ApiServer, ApiStartError, Peer
from discovery.daemon.colocation import locate, member_views
from discovery.daemon.config import Config
from discovery.daemon.engines import KeyFileError, load_keyring, make_engine
from discovery.daemon.pools import PoolOpenError, PoolSet, pool_info
from discovery.daemon.slots import SlotTag, kernel_fingerprint
from discovery.daemon.view import MembershipView
from discovery.daemon.watch import PoolWatch
from discovery.engine import Engine, EngineError
from discovery.keys import Keyring
from discovery.member import MAX_ENDPOINTS, Status

__all__ = ["Sidecar", "StartupError"]

_log = logging.getLogger("discovery.daemon")

#: Seconds between pool-watch scans, by profile: the pidfd sees a death at
#: once, the scan finds new peers' slots and judges stalled heartbeats.
WATCH_INTERVAL = {"host": 0.05, "local": 0.1, "lan": 0.25, "wan": 0.5}
#: First and longest pause between attempts to join the seeds.
JOIN_RETRY = (1.0, 30.0)


class StartupError(RuntimeError):
    """The sidecar cannot start; the message is for the operator."""


EngineFactory = Callable[
    [Config, Keyring | None, frozenset[str], tuple[str, ...], Mapping[str, bytes]], Engine
]
#: What the member record advertises: pools, endpoints, slot tags.
_Record = tuple[frozenset[str], tuple[str, ...], dict[str, bytes]]


class Sidecar:
    """One ``aiocoloc-discoveryd``."""

    def __init__(self, config: Config, engine_factory: EngineFactory = make_engine) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._fingerprint = kernel_fingerprint()
        self.pools = PoolSet(
            config.sysfs_root, self._record_changed, vfio=config.doorbells == "vfio"
        )
        # Local processes get the doorbell devices we own through VFIO here.
        self.grants = (
            GrantServer(grants_path(config.api), self.pools.device)
            if config.doorbells == "vfio"
            else None
        )
        self.advertised = AdvertisedEndpoints(MAX_ENDPOINTS, self._record_changed)
        self.api = ApiServer(config.api, self._handle, self._subscribe)
        self.engine: Engine | None = None
        self.view: MembershipView | None = None
        self.watch: PoolWatch | None = None
        self.keyring: Keyring | None = None
        self.joined = not config.join
        self._join_task: asyncio.Task[None] | None = None
        self._record_lock = asyncio.Lock()
        self._advertised_record: _Record | None = None
        self._started = time.monotonic()
        self._stopping = False

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; ``StartupError`` (with nothing left running) if
        something cannot be."""
        config = self.config
        try:
            if config.key_file is not None:
                self.keyring = load_keyring(config.key_file)
            await self.api.bind()
            await self.pools.open_configured(config.pools)
            if self.grants is not None:
                self.grants.start()
            record = self._record()
            try:
                engine = self._engine_factory(config, self.keyring, *record)
            except EngineError as exc:
                raise StartupError(f"cannot set up the {config.engine} engine: {exc}") from None
            self._advertised_record = record
            self.view = MembershipView(engine)
            self.view.start()
            try:
                await engine.start()
            except (EngineError, OSError) as exc:
                await engine.stop()
                await self.view.stop()
                raise StartupError(
                    f"cannot start the {config.engine} engine on {config.bind}: {exc}"
                ) from None
            self.engine = engine
        except (KeyFileError, PoolOpenError, ApiStartError, StartupError) as exc:
            await self._abort()
            raise StartupError(str(exc)) from None
        self.watch = PoolWatch(
            self.pools,
            self.view.watchable,
            self.view.declare_failed,
            self.view.revive,
            self.view.declared_failed,
            fingerprint=self._fingerprint,
            interval=WATCH_INTERVAL[config.profile],
        )
        self.watch.start()
        if config.join:
            self._join_task = asyncio.get_running_loop().create_task(self._join())
        await self.api.serve()
        local = engine.local()
        _log.info(
            "node %s up: %s engine, profile %s, gossip on %s, %d pool(s), API on %s",
            local.node,
            config.engine,
            config.profile,
            ", ".join(local.addresses) or config.bind,
            len(local.pools),
            config.api,
        )

    async def _abort(self) -> None:
        await self.api.close()
        if self.grants is not None:
            await self.grants.close()
        await self.pools.close()

    async def stop(self) -> None:
        """Leave gracefully and release everything.  Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        _log.info("leaving")
        await self.api.close()
        if self.grants is not None:
            await self.grants.close()
        if self._join_task is not None:
            self._join_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._join_task
        if self.watch is not None:
            await self.watch.stop()
        if self.engine is not None:
            try:
                await self.engine.leave()
            except EngineError as exc:
                _log.warning("could not leave cleanly: %s", exc)
        await self.pools.close()  # after the leave: peers see it first
        if self.engine is not None:
            await self.engine.stop()
        if self.view is not None:
            await self.view.stop()
        self.advertised.close()

    async def _join(self) -> None:
        seeds = [str(seed) for seed in self.config.join]
        delay, longest = JOIN_RETRY
        while True:
            assert self.engine is not None
            try:
                count = await self.engine.join(seeds)
            except EngineError as exc:
                _log.warning("join: %s; trying again in %g s", exc, delay)
            else:
                _log.info("joined the cluster through %d of %d seed(s)", count, len(seeds))
                self.joined = True
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def reload(self) -> None:
        """SIGHUP: re-probe the pools and reload the key file."""
        _log.info(
            "reloading: re-probing pools%s", " and the key file" if self.config.key_file else ""
        )
        if self.config.key_file is not None and self.engine is not None:
            try:
                keyring = load_keyring(self.config.key_file)
            except KeyFileError as exc:
                _log.error("keeping the keys we have: %s", exc)
            else:
                if keyring == self.keyring:
                    _log.info("key file unchanged")
                else:
                    await self._set_keyring(keyring)
        changed = await self.pools.reprobe()
        _log.info(
            "re-probe done: %d pool(s) mapped%s",
            len(self.pools.ids()),
            " (changed)" if changed else "",
        )

    async def _set_keyring(self, keyring: Keyring) -> None:
        assert self.engine is not None
        try:
            await self.engine.set_keyring(keyring)
        except EngineError as exc:
            _log.error("keeping the keys we have: %s", exc)
            return
        self.keyring = keyring
        _log.info("keys reloaded: %r", keyring)

    # -- the member record ------------------------------------------------------------

    def _record(self) -> _Record:
        """What our record advertises: the pools mapped, servers' endpoints,
        and our slot tag in each pool (for the pool watch of our peers)."""
        slots = {
            mapped.id: SlotTag(mapped.pool.endpoint_id, self._fingerprint).encode()
            for mapped in self.pools.mapped()
        }
        return self.pools.ids(), self.advertised.endpoints(), slots

    async def _record_changed(self) -> None:
        """Announce our pools, endpoints and slots if they changed."""
        async with self._record_lock:
            if self.engine is None or self._stopping:
                return
            record = self._record()
            if record == self._advertised_record:
                return
            pools, endpoints, slots = record
            try:
                await self.engine.update_local(pools=pools, endpoints=endpoints, slots=slots)
            except EngineError as exc:
                _log.error("cannot announce our new record: %s", exc)
                return
            self._advertised_record = record
            _log.info("announced pools %s", sorted(pools) or "(none)")

    # -- the API --------------------------------------------------------------------------

    def _subscribe(self) -> Any:
        assert self.view is not None
        return self.view.subscribe()

    async def _handle(self, request: Request, peer: Peer) -> Any:
        if self.view is None or self.engine is None:
            raise ApiError("failed", "the daemon is starting")
        args = request.args
        if request.op == "status":
            return self.status()
        if request.op == "members":
            views = member_views(self.view.local(), self.view.members())
            return {"members": [v.to_json() for v in views]}
        if request.op == "colocated":
            return locate(args["address"], self.view.local(), self.view.members()).to_json()
        if request.op == "pools":
            return {"pools": [pool_info(m).to_json() for m in self.pools.mapped()]}
        if request.op == "pools.attach":
            return {"pool": (await self.pools.attach(args["name"])).to_json()}
        if request.op == "pools.detach":
            return {"pool": (await self.pools.detach(args["name"])).to_json()}
        if request.op == "advertise":
            return {"endpoints": await self.advertised.advertise(args["endpoints"], peer.pid)}
        if request.op == "withdraw":
            return {"endpoints": await self.advertised.withdraw(args["endpoints"])}
        raise ApiError("unknown-op", f"{request.op} is not served")  # OPS and this disagree

    def status(self) -> dict[str, Any]:
        """What ``status`` answers."""
        assert self.view is not None and self.engine is not None
        counts = {status.value: 0 for status in Status}
        for member in self.view.members():
            counts[member.status.value] += 1
        local = self.view.local()
        return {
            "node": local.node,
            "addresses": list(local.addresses),
            "pid": os.getpid(),
            "engine": self.config.engine,
            "profile": self.config.profile,
            "api": str(self.config.api),
            "api_version": API_VERSION,
            "uptime": round(time.monotonic() - self._started, 3),
            "joined": self.joined,
            "encrypted": self.keyring is not None,
            "members": counts,
            "pools": sorted(local.pools),
            "endpoints": list(local.endpoints),
            "watching": self.watch.watched() if self.watch is not None else {},
            "engine_stats": self.engine.stats(),
        }
