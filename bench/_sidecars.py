"""Real ``aiocoloc-discoveryd`` processes on loopback, for ``bench/discovery.py``.

``SidecarProcess`` is one daemon (and, with ``--engine serf``, the Serf
agent it starts); ``ApiView`` follows one daemon's membership through its
local API, stamping every change with the time it arrived; ``Fleet`` owns
every process and temporary file of a run and removes them all, whatever
happens (Ctrl-C, SIGTERM, a failed measurement).

A member's processes run in a session of their own (a terminal's ^C is the
bench's to handle) and die with the bench (``PR_SET_PDEATHSIG``), so even a
bench killed with SIGKILL leaves no daemon behind (only its temporary
directory, and a pool if it was killed while the co-located pair ran); a
daemon's Serf agent dies with its daemon the same way.

Serf's agent does not report bytes sent in its RPC ``stats``, and
``/proc/<pid>/io`` does not count ``sendto``.  Its memberlist counts them
(``memberlist.udp.sent``, ``memberlist.tcp.sent``: payload bytes, like the
embedded engine's ``udp_out_bytes`` and ``tcp_out_bytes``) and reports them
to a statsd address given in a config file: each Serf member gets a tiny
wrapper as ``--serf-binary`` that adds that file to the agent's command
line, and a UDP socket of the bench's that sums what its agent reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from discovery.client import SidecarClient, SidecarUnavailable
from discovery.events import Event

__all__ = [
    "DAEMON",
    "PORT",
    "ApiView",
    "DaemonError",
    "Fleet",
    "SidecarProcess",
    "StatsdCounter",
]

DAEMON = str(Path(sys.executable).with_name("aiocoloc-discoveryd"))
#: Gossip port of every member (each has a loopback address of its own).
PORT = 7946
#: Pool of the co-located pair: only the member table is used.
POOL_SIZE = 1 << 18
#: Metrics of memberlist (in Serf's agent) that count payload bytes sent.
SENT_METRICS = ("memberlist.udp.sent", "memberlist.tcp.sent")

_PR_SET_PDEATHSIG = 1
# Loaded here, in the parent: the child between fork and exec only calls it.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class DaemonError(RuntimeError):
    """A daemon did not start or serve its API: one line saying why (its
    last log line), and the end of its log in ``log``."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (to tell it from a later process
    that reuses the number), None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out += [int(child) for child in text.split()]
    return out


class StatsdCounter(asyncio.DatagramProtocol):
    """Sums the bytes-sent counters one Serf agent reports over statsd."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        for line in data.decode("ascii", "replace").splitlines():
            name, _, rest = line.partition(":")
            if name.endswith(SENT_METRICS):
                with contextlib.suppress(ValueError):
                    self.sent += float(rest.split("|", 1)[0])

    @property
    def address(self) -> str:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class SidecarProcess:
    """One ``aiocoloc-discoveryd`` on ``ip``, its API socket and log in
    ``directory``; with the Serf engine, the agent it starts too."""

    def __init__(
        self,
        directory: Path,
        node: str,
        ip: str,
        *,
        engine: str,
        profile: str,
        join: str | None = None,
        pools: Iterable[str] = (),
        serf_binary: str | None = None,
        log_level: str = "info",
    ) -> None:
        self.node, self.ip, self.engine = node, ip, engine
        self.address = f"{ip}:{PORT}"
        self.api = directory / f"{node}.sock"
        self.log_path = directory / f"{node}.log"
        argv = [
            DAEMON,
            "--node", node,
            "--bind", self.address,
            "--engine", engine,
            "--profile", profile,
            "--api", str(self.api),
            "--log-level", log_level,
            *(["--join", join] if join else []),
            *(arg for pool in pools for arg in ("--pool", pool)),
            *(["--serf-binary", serf_binary] if serf_binary else []),
        ]  # fmt: skip
        self.statsd: StatsdCounter | None = None
        self.agent: tuple[int, int] | None = None  # the Serf agent: (pid, start time)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._start = _start_time(self.proc.pid)
        self.client = SidecarClient(self.api, timeout=5.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def error(self, what: str) -> DaemonError:
        """``DaemonError``: ``what``, with the last line of our log."""
        tail = self.log_tail()
        last = tail.splitlines()[-1] if tail else "(empty log)"
        return DaemonError(f"{self.node} {what}: {last}", tail)

    async def wait_ready(self, timeout: float) -> float:
        """Until the API answers ``status``; returns the monotonic time it
        first did.  ``DaemonError`` (with the log) if it exits or is late."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.error(f"exited with {self.proc.returncode}")
            if self.api.exists():
                try:
                    await self.client.status()
                except SidecarUnavailable:
                    pass
                else:
                    ready = time.monotonic()
                    if self.engine == "serf":
                        self._find_agent()
                    return ready
            if time.monotonic() > deadline:
                raise self.error(f"did not serve its API within {timeout:g} s")
            await asyncio.sleep(0.02)

    def _find_agent(self) -> None:
        for child in _children(self.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "serf":
                    start = _start_time(child)
                    if start is not None:
                        self.agent = (child, start)
                        return
        raise self.error("has no serf agent among its children")

    def pids(self) -> list[int]:
        """The member's live processes: the daemon, then its agent."""
        out = []
        if self.running and _start_time(self.pid) == self._start:
            out.append(self.pid)
        if self.agent is not None and _start_time(self.agent[0]) == self.agent[1]:
            out.append(self.agent[0])
        return out

    def signal(self, signum: signal.Signals) -> None:
        """``signum`` to the whole member (daemon and agent) at once:
        SIGKILL, SIGSTOP and SIGCONT act on the member as a machine would."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def terminate(self) -> None:
        """SIGTERM to the daemon only: it leaves gracefully (and has its
        agent leave)."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def finish(self) -> None:
        """Kill whatever of it still runs, and reap the daemon."""
        for signum in (signal.SIGKILL, signal.SIGCONT):
            self.signal(signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.statsd is not None:
            self.statsd.close()


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
