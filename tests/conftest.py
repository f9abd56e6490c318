"""Shared fixtures: both ring implementations, a /dev/shm leak check, a
check that every counted object (``aiocoloc.debug``) is given back, and a
private registry directory per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from aiocoloc import _ring_py, debug
from aiocoloc.connect import policy
from aiocoloc.connect.colocation import local_pools
from aiocoloc.notify import hub

try:
    from aiocoloc import _ring as _ring_c
except ImportError:  # pragma: no cover - the suite builds the extension first
    _ring_c = None

#: ``make fuzz`` multiplies the examples of every property and model test.
FUZZ_SCALE = max(1, int(os.environ.get("AIOCOLOC_FUZZ_SCALE", "1")))
SHM_DIR = "/dev/shm"
SHM_PREFIX = "aiocoloc"

RING_IMPLEMENTATIONS = [
    pytest.param(
        _ring_c,
        id="cython",
        marks=pytest.mark.skipif(_ring_c is None, reason="Cython ring not built"),
    ),
    pytest.param(_ring_py, id="python"),
]


@pytest.fixture(params=RING_IMPLEMENTATIONS)
def ring_impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each ring implementation in turn."""
    module: ModuleType = request.param
    return module


def _shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:  # pragma: no cover
        return set()


@pytest.fixture(autouse=True)
def no_shm_leak() -> Iterator[None]:
    """Fail any test that leaves aiocoloc entries behind in /dev/shm."""
    before = _shm_entries()
    yield
    leaked = _shm_entries() - before
    assert not leaked, f"test left shared memory behind: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def no_live_objects() -> Iterator[None]:
    """Fail any test after which more transports, control channels, pipe
    ends or pool references are alive than before it (``aiocoloc.debug``): a leak fails
    the test that caused it."""
    before = debug.live.snapshot()
    yield
    local_pools().close_idle()
    after = debug.live.snapshot()
    grown = {name: (before[name], n) for name, n in after.items() if n > before[name]}
    assert not grown, f"test left objects alive (before, after): {grown}"


@pytest.fixture(autouse=True)
def private_registry(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Each test gets its own registry directory and the default policy, so
    tests never see each other's servers (child processes inherit it)."""
    directory = tmp_path_factory.mktemp("registry")
    directory.chmod(0o700)
    monkeypatch.setenv("AIOCOLOC_RUNTIME_DIR", str(directory))
    monkeypatch.delenv("AIOCOLOC_MODE", raising=False)
    monkeypatch.delenv("AIOCOLOC_TRUST", raising=False)
    monkeypatch.delenv("AIOCOLOC_HANDSHAKE_TIMEOUT", raising=False)
    monkeypatch.delenv("AIOCOLOC_POOL_SIZE", raising=False)
    # Hubs close with their last connection, as every test but the lingering
    # ones expects (server processes the tests start inherit it).
    monkeypatch.setenv("AIOCOLOC_HUB_LINGER", "0")
    policy.reset()
    local_pools().close_idle()
    yield directory
    policy.reset()
    local_pools().close_idle()  # pools lingering for a next connection
    hub.close_resting_hubs()  # and hubs


_uvloop_warm = False


def open_fds() -> set[int]:
    """This process's open descriptors (to check nothing leaks).

    uvloop keeps a pipe for the whole process from its first run on: run it
    once first, so that pipe is never counted as a leak."""
    global _uvloop_warm
    if not _uvloop_warm:
        import asyncio

        import uvloop

        uvloop.run(asyncio.sleep(0))
        _uvloop_warm = True
    return {int(name) for name in os.listdir("/proc/self/fd")}
