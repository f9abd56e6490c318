"""Every conformance test leaves no descriptor open (sockets, eventfds, memfds)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from aiocoloc.connect.colocation import local_pools

from ..conftest import open_fds


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    local_pools().close_idle()  # a server's pool lingers for the next one, by design
    leaked = open_fds() - before
    if leaked:  # what only a cycle still holds is closed by the collector
        gc.collect()
        leaked = open_fds() - before
    assert not leaked, f"test left descriptors open: {sorted(leaked)}"
