"""The cluster key's MACs over handshakes between kernels
(``aiocoloc.connect.cluster_auth``): what verifies, what does not, and how
the key file is found and re-read."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from aiocoloc.connect import cluster_auth as module
from aiocoloc.connect.cluster_auth import ClusterAuth, cluster_auth
from discovery.keys import Keyring


def test_macs_verify_with_any_key_of_the_ring_and_bind_every_part() -> None:
    old, new = os.urandom(32), os.urandom(16)
    signer = ClusterAuth([old])
    mac = signer.sign("server", b"challenge", "10.0.0.1", 80, "pool")
    assert ClusterAuth([new, old]).verify(mac, "server", b"challenge", "10.0.0.1", 80, "pool")
    assert not ClusterAuth([new]).verify(mac, "server", b"challenge", "10.0.0.1", 80, "pool")
    others = [
        ("client", b"challenge", "10.0.0.1", 80, "pool"),  # the other role
        ("server", b"challengf", "10.0.0.1", 80, "pool"),
        ("server", b"challenge", "10.0.0.1", 81, "pool"),
        ("server", b"challenge", "10.0.0.18", 0, "pool"),  # parts are length-prefixed
        ("server", b"challenge", "10.0.0.1", 80),
    ]
    for parts in others:
        assert not signer.verify(mac, *parts), parts
    assert not signer.verify(None, "server", b"challenge")
    assert not signer.verify(mac[:-1], "server", b"challenge", "10.0.0.1", 80, "pool")
    with pytest.raises(ValueError):
        ClusterAuth([])


def test_the_key_file_comes_from_the_environment_and_is_reread_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AIOCOLOC_KEY_FILE", raising=False)
    assert cluster_auth() is None
    path = tmp_path / "cluster.keys"
    monkeypatch.setenv("AIOCOLOC_KEY_FILE", str(path))
    with caplog.at_level(logging.WARNING, "aiocoloc.connect.cluster_auth"):
        assert cluster_auth() is None and cluster_auth() is None
    assert len(caplog.records) == 1 and "stay on TCP" in caplog.records[0].getMessage()
    first = Keyring.generate()
    first.save(path)
    auth = cluster_auth()
    assert auth is not None and auth is cluster_auth()  # cached
    mac = auth.sign("client", b"x")
    Keyring.generate().with_key(first.primary).save(path)  # a rotation: a new primary
    os.utime(path, (1, 1))  # (a new stamp even within the clock's resolution)
    rotated = cluster_auth()
    assert rotated is not None and rotated is not auth
    assert rotated.verify(mac, "client", b"x")  # the old key still verifies
    path.write_text("not base64\n")
    os.utime(path, (2, 2))
    assert cluster_auth() is None
    monkeypatch.setattr(module, "_cache", None)
