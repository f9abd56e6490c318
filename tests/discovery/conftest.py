"""Fixtures of the discovery tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

# ----------------------------------------------------------------- Serf

#: Debian's package of HashiCorp Serf (0.9.4 on bookworm).
SERF_PACKAGE = "serf"


def _apt_install(package: str) -> str | None:
    """Install ``package`` with apt-get (updating the lists if the first
    try fails); None on success, else why not."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    first = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if first.returncode == 0:
        return None
    update = subprocess.run(
        ["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600
    )
    if update.returncode != 0:
        return f"apt-get update failed: {update.stderr.strip()[-300:]}"
    second = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if second.returncode != 0:
        return f"apt-get install {package} failed: {second.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def serf_binary() -> str:
    """The ``serf`` executable, installed with apt-get when missing (as
    root); the test is skipped, saying why, only if that cannot work."""
    found = shutil.which("serf")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("serf is not installed and we are not root to apt-get install it")
    if shutil.which("apt-get") is None:
        pytest.skip("serf is not installed and there is no apt-get to install it")
    try:
        reason = _apt_install(SERF_PACKAGE)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"apt-get could not run: {exc}"
    found = shutil.which("serf")
    if found is None:
        pytest.skip(f"cannot install serf: {reason or 'installed, but no serf on PATH'}")
    return found


SerfAgentFactory = Callable[..., Awaitable[Any]]


@pytest_asyncio.fixture
async def serf_agents(serf_binary: str) -> AsyncIterator[SerfAgentFactory]:
    """A factory of started ``SerfAgent``s on loopback (``local`` profile,
    gossip on a kernel-chosen port unless ``bind`` says otherwise); every
    agent is stopped at the end of the test, killed if it will not stop."""
    from discovery.serf.agent import SerfAgent

    agents: list[SerfAgent] = []

    async def start(node: str, *, bind: str = "127.0.0.1:0", **options: Any) -> SerfAgent:
        options.setdefault("profile", "local")
        agent = SerfAgent(node, bind, binary=serf_binary, **options)
        agents.append(agent)
        await agent.start()
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.stop(leave=False, timeout=2.0)
            pid = agent.pid
            if agent.running and pid is not None:  # pragma: no cover - stop() failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def no_stray_serf(serf_binary: str) -> Iterator[None]:
    """Fail a test that leaves a ``serf`` process of its own behind."""

    def children() -> set[int]:
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
                with open(f"/proc/{entry}/comm", "rb") as comm:
                    name = comm.read().strip()
                # our own children only, and not the dead awaiting their reaping
                if name == b"serf" and int(fields[1]) == os.getpid() and fields[0] != b"Z":
                    found.add(int(entry))
        return found

    before = children()
    yield
    stray = children() - before
    for pid in stray:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not stray, f"serf processes left running: {sorted(stray)}"
