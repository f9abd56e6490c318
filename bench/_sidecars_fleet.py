"""Every process, pool and temporary file of a ``bench/discovery.py`` run
(``Fleet``): the members it starts on loopback addresses of their own, the
wrapper that has a Serf agent report its bytes sent to the bench, the POSIX
pools of the co-located pair, and the removal of it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bench._sidecars import PORT, DaemonError, SidecarProcess, StatsdCounter

__all__ = ["Fleet"]

#: Pool of the co-located pair: only the member table is used.
POOL_SIZE = 1 << 18


class Fleet:
    """Every daemon, agent, pool and temporary file of a run; ``close()``
    removes them all (idempotent, safe to call from a signal's aftermath)."""

    def __init__(self, log_level: str = "info") -> None:
        self.log_level = log_level
        self.directory = Path(tempfile.mkdtemp(prefix="aiocoloc-bench-discovery-"))
        self.sidecars: list[SidecarProcess] = []
        self.pools: list[str] = []
        self._serf: str | None = None

    # -- addresses ----------------------------------------------------------------------

    @staticmethod
    def loopback_ips(count: int) -> list[str]:
        """``count`` loopback addresses on which the gossip port is free
        (TCP and UDP), in a /24 of 127.0.0.0/8 picked at random."""
        for _ in range(50):
            a, b = random.randrange(10, 60), random.randrange(0, 256)
            first = random.randrange(1, 255 - count)
            ips = [f"127.{a}.{b}.{first + i}" for i in range(count)]
            if all(_port_free(ip) for ip in ips):
                return ips
        raise DaemonError(f"found no {count} loopback addresses with port {PORT} free")

    # -- members ------------------------------------------------------------------------

    async def start(
        self,
        node: str,
        ip: str,
        *,
        engine: str,
        profile: str,
        join: str | None = None,
        pools: Iterable[str] = (),
    ) -> SidecarProcess:
        """Spawn a daemon (not waiting for it): with the Serf engine, with
        its agent reporting bytes sent to a counter of ours."""
        statsd = None
        serf_binary = None
        if engine == "serf":
            loop = asyncio.get_running_loop()
            _, statsd = await loop.create_datagram_endpoint(
                StatsdCounter, local_addr=("127.0.0.1", 0)
            )
            serf_binary = self._serf_wrapper(node, statsd.address)
        try:
            sidecar = SidecarProcess(
                self.directory,
                node,
                ip,
                engine=engine,
                profile=profile,
                join=join,
                pools=pools,
                serf_binary=serf_binary,
                log_level=self.log_level,
            )
        except BaseException:
            if statsd is not None:
                statsd.close()
            raise
        sidecar.statsd = statsd
        self.sidecars.append(sidecar)
        return sidecar

    def _serf_wrapper(self, node: str, statsd: str) -> str:
        if self._serf is None:
            found = shutil.which("serf")
            if found is None:
                raise DaemonError("no serf executable on PATH (install HashiCorp Serf)")
            self._serf = found
        config = self.directory / f"{node}-statsd.json"
        config.write_text(json.dumps({"statsd_addr": statsd}))
        wrapper = self.directory / f"{node}-serf"
        wrapper.write_text(f'#!/bin/sh\nexec {self._serf} "$@" -config-file={config}\n')
        wrapper.chmod(0o755)
        return str(wrapper)

    async def stop(self, sidecars: Iterable[SidecarProcess]) -> None:
        """Close our API connections to these members, kill them and forget them."""
        sidecars = list(sidecars)
        for sidecar in sidecars:
            await sidecar.client.close()
        self.finish(sidecars)

    def finish(self, sidecars: Iterable[SidecarProcess]) -> None:
        """Kill these members now and forget them."""
        done = set()
        for sidecar in sidecars:
            sidecar.finish()
            done.add(id(sidecar))
        self.sidecars = [s for s in self.sidecars if id(s) not in done]

    # -- pools ----------------------------------------------------------------------------

    def posix_pool(self, lease: float = 1.0) -> str:
        """A formatted POSIX pool (as an operator provisions one) for two
        co-located members; unlinked by ``close()``."""
        from aiocoloc.shm import Pool, PoolConfig

        name = f"aiocoloc-bench-d{secrets.token_hex(5)}"
        self.pools.append(name)
        config = PoolConfig(
            slice_size=4096, max_members=16, max_pipes=4, max_slices_per_pipe=4, lease=lease
        )
        Pool.open_posix(name, POOL_SIZE, config).close()  # the name stays
        return name

    def unlink_pool(self, name: str) -> None:
        import posix_ipc

        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + name)
        if name in self.pools:
            self.pools.remove(name)

    # -- the end ----------------------------------------------------------------------------

    def close(self, *, keep_logs: bool = False) -> None:
        self.finish(list(self.sidecars))
        for name in list(self.pools):
            self.unlink_pool(name)
        if not keep_logs:
            shutil.rmtree(self.directory, ignore_errors=True)


def _port_free(ip: str) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((ip, PORT))
            except OSError:
                return False
    return True
