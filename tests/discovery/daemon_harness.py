"""Real ``aiocoloc-discoveryd`` processes for tests: start, wait until they
serve their API, signal, kill, read their logs.  Loopback only: each daemon
gets an address of its own in 127.0.0.0/8."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from discovery.client import SidecarClient

DAEMON = str(Path(sys.executable).with_name("aiocoloc-discoveryd"))
CLI = str(Path(sys.executable).with_name("aiocoloc"))
PORT = 7946


def loopback_ips(count: int) -> list[str]:
    """``count`` distinct random loopback addresses (tests running at once
    on this machine are unlikely to pick the same)."""
    base = random.randrange(64, 250), random.randrange(0, 250)
    first = random.randrange(1, 200)
    return [f"127.{base[0]}.{base[1]}.{first + i}" for i in range(count)]


class Daemon:
    """One sidecar process on ``ip``, its API socket and log in ``directory``."""

    def __init__(
        self,
        directory: Path,
        node: str,
        ip: str,
        *args: str,
        env: dict[str, str] | None = None,
        api: Path | None = None,
    ) -> None:
        """``api``: the socket the daemon finds by itself (no ``--api``)."""
        self.node = node
        self.ip = ip
        self.address = f"{ip}:{PORT}"
        self.api = api or directory / f"{node}.sock"
        self.log_path = directory / f"{node}.log"
        self.argv = [
            DAEMON,
            "--node", node,
            "--bind", self.address,
            "--profile", "host",
            "--log-level", "debug",
            *([] if api else ["--api", str(self.api)]),
            *args,
        ]  # fmt: skip
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 5.0) -> SidecarClient:
        return SidecarClient(self.api, timeout=timeout)

    def request(self, op: str, **args: Any) -> Any:
        """One API request over a blocking socket; the reply's JSON."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.api))
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until the API answers ``status``; fails with the log if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.node} exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                if self.request("status").get("ok"):
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node} did not serve its API:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def finish(self) -> None:
        """Kill it if it still runs and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Cluster:
    """Daemons started by a test, all killed at its end."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.env = env
        self.daemons: list[Daemon] = []

    def start(self, node: str, ip: str, *args: str, api: Path | None = None) -> Daemon:
        daemon = Daemon(self.directory, node, ip, *args, env=self.env, api=api)
        self.daemons.append(daemon)
        return daemon

    def finish(self) -> None:
        for daemon in self.daemons:
            daemon.finish()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``aiocoloc`` CLI."""
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=30, env=env or dict(os.environ)
    )
