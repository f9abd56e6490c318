"""A ``serf agent`` process of our own.

``SerfAgent`` starts the agent with its RPC listener on loopback, waits until
that listener answers as the expected node, and stops it: a graceful
``leave`` over RPC (the agent exits after it), then SIGTERM, then SIGKILL,
each after a timeout.  The agent dies with us (``PR_SET_PDEATHSIG``), so a
crashed sidecar leaves no ``serf`` behind.

Profiles: Serf knows ``lan``, ``wan`` and ``local``; our ``host`` profile
(members on one machine, loopback between them) is Serf's ``local``.

The RPC auth key is not a command-line flag of Serf's: it goes in a JSON
config file written to a private directory (``workdir``, or a temporary one)
and deleted as soon as the agent has read it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Mapping, Sequence

from discovery.member import join_host, split_host
from discovery.serf.rpc import SerfRPC
from discovery.serf.wire import SerfAuthError, SerfError

__all__ = ["PROFILES", "SerfAgent", "SerfAgentStartError", "serf_profile"]

_log = logging.getLogger("discovery.serf.agent")

#: Our profile names and Serf's (``-profile``) for each.
PROFILES: Mapping[str, str] = {"host": "local", "local": "local", "lan": "lan", "wan": "wan"}
#: Seconds an agent may take to answer on its RPC address after spawning.
START_TIMEOUT = 15.0
#: Seconds a stopping agent gets after each step (leave, SIGTERM).
STOP_TIMEOUT = 5.0
#: Lines of the agent's output kept for error messages.
OUTPUT_LINES = 40
_PR_SET_PDEATHSIG = 1


class SerfAgentStartError(SerfError):
    """The agent did not come up (its last output lines are in the message)."""


def serf_profile(profile: str) -> str:
    """Serf's ``-profile`` for our profile name."""
    try:
        return PROFILES[profile]
    except KeyError:
        raise SerfError(f"unknown profile {profile!r} (want one of {sorted(PROFILES)})") from None


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# Loaded here, in the parent: the child between fork and exec only calls it.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class SerfAgent:
    """One ``serf agent`` child process."""

    def __init__(
        self,
        node: str,
        bind: str,
        *,
        rpc_addr: str | None = None,
        rpc_auth: str | None = None,
        profile: str = "lan",
        encrypt_key: bytes | None = None,
        tags: Mapping[str, str] | None = None,
        advertise: str | None = None,
        snapshot: str | None = None,
        workdir: str | None = None,
        binary: str = "serf",
        log_level: str = "info",
    ) -> None:
        if encrypt_key is not None and len(encrypt_key) not in (16, 24, 32):
            raise SerfError(f"a Serf key is 16, 24 or 32 bytes, not {len(encrypt_key)}")
        if rpc_addr is not None and not split_host(rpc_addr)[0]:
            raise SerfError(f"bad RPC address {rpc_addr!r} (want ip:port)")
        self.node = node
        self.bind = bind
        self.rpc_auth = rpc_auth
        self.profile = serf_profile(profile)
        self._rpc_addr = rpc_addr
        self.encrypt_key = encrypt_key  # -encrypt at the next start (a rotation changes it)
        self.tags = dict(tags or {})  # -tag at the next start
        self.advertise = advertise
        self.snapshot = snapshot
        self.workdir = workdir
        self.binary = binary
        self.log_level = log_level
        self.rpc_address = rpc_addr or ""  # the address in use once started
        self._process: asyncio.subprocess.Process | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._pump: asyncio.Task[None] | None = None

    # ------------------------------------------------------------- state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def output(self) -> list[str]:
        """The agent's last output lines."""
        return list(self._output)

    # ---------------------------------------------------------- start/stop

    def pin_gossip_port(self, port: int) -> None:
        """Start again on ``port``, the gossip port the agent was given, if
        it was bound to port 0 and advertises no port of its own: on
        another, the others would see two nodes claim its name, and Serf's
        conflict resolution would shut the newcomer down."""
        host, bound = split_host(self.bind)
        advertised = split_host(self.advertise)[1] if self.advertise else 0
        if host and bound == 0 and not advertised:
            self.bind = join_host(host, port)

    def command(self, rpc_addr: str, config_file: str | None) -> list[str]:
        """The agent's command line."""
        args = [
            self.binary,
            "agent",
            f"-node={self.node}",
            f"-bind={self.bind}",
            f"-rpc-addr={rpc_addr}",
            f"-profile={self.profile}",
            f"-log-level={self.log_level}",
        ]
        if self.advertise:
            args.append(f"-advertise={self.advertise}")
        if self.encrypt_key is not None:
            args.append(f"-encrypt={base64.b64encode(self.encrypt_key).decode('ascii')}")
        if self.snapshot:
            args.append(f"-snapshot={self.snapshot}")
        if config_file:
            args.append(f"-config-file={config_file}")
        for key, value in sorted(self.tags.items()):
            args += ["-tag", f"{key}={value}"]
        return args

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn the agent and wait until it answers on its RPC address as
        ``node``; ``SerfAgentStartError`` otherwise (the process is killed).
        With no ``rpc_addr`` given, a free loopback port is picked (again if
        another process took it meanwhile)."""
        if self.running:
            raise SerfError(f"serf agent {self.node!r} is already running")
        if shutil.which(self.binary) is None:
            raise SerfAgentStartError(f"no {self.binary!r} executable found (install Serf)")
        attempts = 1 if self._rpc_addr else 3
        for attempt in range(attempts):
            rpc_addr = self._rpc_addr or join_host("127.0.0.1", free_loopback_port())
            try:
                await self._start_once(rpc_addr, timeout)
                return
            except SerfAgentStartError as exc:
                if attempt + 1 == attempts or "address already in use" not in str(exc):
                    raise
                _log.info("RPC port of %s taken meanwhile, trying another", self.node)

    async def _start_once(self, rpc_addr: str, timeout: float) -> None:
        private = self.workdir is None and self.rpc_auth is not None
        directory = tempfile.mkdtemp(prefix="aiocoloc-serf-") if private else self.workdir
        config_file = None
        try:
            if self.rpc_auth is not None and directory is not None:
                config_file = os.path.join(directory, f"serf-{self.node}-rpc.json")
                fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as out:
                    json.dump({"rpc_auth": self.rpc_auth}, out)
            self._output.clear()
            self._process = await asyncio.create_subprocess_exec(
                *self.command(rpc_addr, config_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # a terminal's ^C is ours to handle, not the agent's
                preexec_fn=_die_with_parent,
            )
            self.rpc_address = rpc_addr
            self._pump = asyncio.create_task(self._read_output(self._process))
            _log.info(
                "started serf agent %s (pid %d), RPC %s", self.node, self._process.pid, rpc_addr
            )
            await self._wait_ready(timeout)
        except BaseException:
            self.kill()
            await self.wait(1.0)
            raise
        finally:
            if config_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(config_file)
            if private and directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._output.append(text)
                _log.debug("[%s] %s", self.node, text)

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while loop.time() < deadline:
            if not self.running:
                if self._pump is not None:  # its last words
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
                raise SerfAgentStartError(
                    f"serf agent {self.node!r} exited ({self.returncode}): "
                    + " | ".join(self.output()[-8:])
                )
            try:
                rpc = await SerfRPC.connect(self.rpc_address, auth_key=self.rpc_auth, timeout=2.0)
            except SerfAuthError:
                raise
            except SerfError as exc:
                last = exc
                await asyncio.sleep(0.05)
                continue
            try:
                name = (await rpc.stats()).get("agent", {}).get("name")
            finally:
                await rpc.close()
            if name != self.node:  # another agent on that port
                raise SerfAgentStartError(
                    f"RPC address {self.rpc_address} answers as {name!r}, not {self.node!r}: "
                    "address already in use"
                )
            return
        raise SerfAgentStartError(
            f"serf agent {self.node!r} did not answer on {self.rpc_address} within {timeout:g}s "
            f"({last}): " + " | ".join(self.output()[-8:])
        )

    async def stop(self, *, leave: bool = True, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the agent: ``leave`` over RPC first (the others see it leave;
        otherwise they see it fail), then SIGTERM, then SIGKILL."""
        if self._process is None:
            return
        if leave and self.running:
            try:
                rpc = await SerfRPC.connect(
                    self.rpc_address, auth_key=self.rpc_auth, timeout=timeout
                )
                try:
                    await rpc.leave()
                finally:
                    await rpc.close()
            except SerfError as exc:
                _log.warning("serf agent %s did not leave gracefully: %s", self.node, exc)
        # SIGTERM: the agent shuts down without leaving (leave_on_terminate
        # is off by default), the others see it fail.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if await self.wait(timeout if leave or sig == signal.SIGKILL else 0):
                break
            log = _log.info if leave or sig == signal.SIGKILL else _log.debug
            log("serf agent %s still running: %s", self.node, sig.name)
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)
        await self.wait(timeout)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the process to end; whether it has."""
        process = self._process
        if process is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
        except TimeoutError:
            return False
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
            self._pump = None
        return True

    def kill(self) -> None:
        """SIGKILL the agent now (no leave; the others see it fail)."""
        if self.running and self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def join(self, addresses: Sequence[str]) -> int:
        """Join through a short-lived RPC connection (for tests and tools)."""
        rpc = await SerfRPC.connect(self.rpc_address, auth_key=self.rpc_auth)
        try:
            return await rpc.join(addresses)
        finally:
            await rpc.close()
