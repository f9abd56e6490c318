"""Shared fixtures: both ring implementations, and a /dev/shm leak check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from aiocoloc import _ring_py

try:
    from aiocoloc import _ring as _ring_c
except ImportError:  # pragma: no cover - the suite builds the extension first
    _ring_c = None

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
