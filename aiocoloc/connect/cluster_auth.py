"""Authenticating a control channel between kernels with the cluster key.

Within one kernel a control socket is an abstract Unix socket and the peer's
user id (``SO_PEERCRED``) says whom we talk to.  Between VMs the control
channel is TCP and nothing of the kind exists, so both sides prove they hold
the cluster key: the keyring the discovery sidecars share
(``discovery.keys``; the file is named by ``$AIOCOLOC_KEY_FILE``).

Each side sends an HMAC-SHA256 over the handshake's transcript: the
client's challenge from ``hello``, the TCP 4-tuple, the pool, the pipes and
the nonces both write through the pool.  The server's MAC covers the
client's fresh challenge and the client's covers the server's fresh nonce,
so neither can be replayed, and both bind the pool proof to the key: a
peer without the key cannot complete a handshake even with the pool mapped.

The MAC key is derived from each keyring key (HKDF, its own label), so the
gossip keys are never used as they are for anything else.  The primary key
signs; every key verifies, so a key rotation never breaks a handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aiocoloc.control.messages import MAC_SIZE

__all__ = ["KEY_FILE_ENV", "ClusterAuth", "cluster_auth"]

_log = logging.getLogger("aiocoloc.connect.cluster_auth")

KEY_FILE_ENV = "AIOCOLOC_KEY_FILE"
_LABEL = b"aiocoloc control channel v1"

Part = bytes | str | int


def _derive(key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(key)


def _encode(parts: Sequence[Part]) -> bytes:
    """Each part length-prefixed: no two transcripts encode alike."""
    out = bytearray()
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


class ClusterAuth:
    """MACs over handshake transcripts with a keyring's keys."""

    def __init__(self, keys: Sequence[bytes], source: str = "<keys>") -> None:
        if not keys:
            raise ValueError("a cluster key is needed")
        self.source = source
        self._keys = [_derive(bytes(key)) for key in keys]

    def sign(self, role: str, *parts: Part) -> bytes:
        """The MAC ``role`` (``"server"``/``"client"``) sends over ``parts``."""
        return hmac.new(self._keys[0], _encode((role, *parts)), hashlib.sha256).digest()

    def verify(self, mac: bytes | None, role: str, *parts: Part) -> bool:
        """Whether ``mac`` is ``role``'s MAC over ``parts`` with any of our keys."""
        if mac is None or len(mac) != MAC_SIZE:
            return False
        message = _encode((role, *parts))
        found = False
        for key in self._keys:  # every key, always: the time says nothing
            expected = hmac.new(key, message, hashlib.sha256).digest()
            found |= hmac.compare_digest(expected, mac)
        return found


_cache: tuple[tuple[str, float, int], ClusterAuth] | None = None
_lock = threading.Lock()
_warned: dict[str, str] = {}  # path -> the last warning about it


def _warn_once(path: str, message: str) -> None:
    """Warn about ``path`` once per new problem, not once per connection."""
    if _warned.get(path) != message:
        _warned[path] = message
        _log.warning("%s (connections between VMs stay on TCP)", message)


def cluster_auth() -> ClusterAuth | None:
    """The cluster key of this process (``$AIOCOLOC_KEY_FILE``), None
    without one.  Re-read when the file changes (a rotation); a file that
    cannot be read counts as none (logged once per problem)."""
    global _cache
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        return None
    try:
        info = os.stat(path)
    except OSError as exc:
        _warn_once(path, f"cluster key file {path}: {exc}")
        return None
    stamp = (path, info.st_mtime, info.st_size)
    with _lock:
        if _cache is not None and _cache[0] == stamp:
            return _cache[1]
        from discovery.keys import Keyring  # the sidecar's keyring format

        try:
            keyring = Keyring.load(path)
        except (OSError, ValueError) as exc:
            _warn_once(path, f"cluster key file {path} cannot be used: {exc}")
            return None
        auth = ClusterAuth(keyring.keys, path)
        _cache = (stamp, auth)
        return auth
