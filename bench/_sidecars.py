"""Real ``aiocoloc-discoveryd`` processes on loopback, for ``bench/discovery.py``.

``SidecarProcess`` is one daemon (and, with ``--engine serf``, the Serf
agent it starts); ``ApiView`` (``bench._sidecars_view``) follows one
daemon's membership through its local API, stamping every change with the
time it arrived; ``Fleet`` (``bench._sidecars_fleet``) owns every process
and temporary file of a run and removes them all, whatever happens (Ctrl-C,
SIGTERM, a failed measurement).

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
line (``Fleet`` writes it), and a UDP socket of the bench's
(``StatsdCounter``) that sums what its agent reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from discovery.client import SidecarClient, SidecarUnavailable

__all__ = [
    "DAEMON",
    "PORT",
    "DaemonError",
    "SidecarProcess",
    "StatsdCounter",
]

DAEMON = str(Path(sys.executable).with_name("aiocoloc-discoveryd"))
#: Gossip port of every member (each has a loopback address of its own).
PORT = 7946
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
