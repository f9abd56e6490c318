"""The shared keys that authenticate and encrypt gossip.

A keyring holds one or more AES keys (16, 24 or 32 bytes).  The *primary*
key encrypts everything sent; every key is tried to decrypt what arrives.
Rotation is therefore three steps, each rolled out to every member before
the next: add the new key (second line), make it primary (first line),
remove the old one.

A keyring file holds one base64 key a line, the primary first; blank lines
and ``#`` comments are ignored.  The Serf engine passes ``primary`` to
``serf agent -encrypt`` (Serf takes 16, 24 or 32-byte keys too).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["KEY_SIZES", "Keyring"]

#: Key lengths AES accepts (AES-128, AES-192, AES-256).
KEY_SIZES = (16, 24, 32)


class Keyring:
    """An ordered set of AES keys; the first is the primary."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        unique: list[bytes] = []
        for index, key in enumerate(keys):
            if not isinstance(key, bytes | bytearray):
                raise ValueError(f"key {index} is {type(key).__name__}, not bytes")
            _check_size(bytes(key), f"key {index}")
            if bytes(key) not in unique:
                unique.append(bytes(key))
        if not unique:
            raise ValueError("a keyring needs at least one key")
        self._keys: tuple[bytes, ...] = tuple(unique)

    @property
    def primary(self) -> bytes:
        """The key that encrypts."""
        return self._keys[0]

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every key, the primary first (the order decryption tries them)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and other._keys == self._keys

    def __hash__(self) -> int:
        return hash(self._keys)

    def __repr__(self) -> str:
        # Never the key material itself.
        return f"<Keyring {len(self._keys)} key(s), primary {len(self.primary) * 8}-bit>"

    # -- rotation ---------------------------------------------------------

    def with_key(self, key: bytes) -> Keyring:
        """This keyring plus ``key`` (not primary); unchanged if present."""
        return Keyring([*self._keys, key])

    def with_primary(self, key: bytes) -> Keyring:
        """``key`` made primary; ``KeyError`` if the ring does not hold it
        (install it everywhere with ``with_key`` first)."""
        if key not in self._keys:
            raise KeyError("cannot make primary a key the keyring does not hold")
        return Keyring([key, *(k for k in self._keys if k != key)])

    def without_key(self, key: bytes) -> Keyring:
        """``key`` removed; ``KeyError`` if absent, ``ValueError`` if it is
        the primary (make another key primary first)."""
        if key not in self._keys:
            raise KeyError("the keyring does not hold that key")
        if key == self.primary:
            raise ValueError("cannot remove the primary key; make another primary first")
        return Keyring([k for k in self._keys if k != key])

    # -- files ------------------------------------------------------------

    @classmethod
    def generate(cls, size: int = 32) -> Keyring:
        """A keyring of one fresh random key (AES-256 by default)."""
        _check_size(b"\0" * size, "generated key")
        return cls([os.urandom(size)])

    @classmethod
    def parse(cls, lines: Iterable[str], source: str = "<keyring>") -> Keyring:
        """A keyring from keyring-file lines; ``ValueError`` naming the line
        of anything that is not a base64 AES key."""
        keys: list[bytes] = []
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                key = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{source}:{number}: not a base64 key") from None
            _check_size(key, f"{source}:{number}")
            keys.append(key)
        if not keys:
            raise ValueError(f"{source}: holds no keys (one base64 key a line, primary first)")
        return cls(keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring file (see the module docstring)."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{os.fspath(path)}: not a text keyring file") from None
        return cls.parse(text.splitlines(), os.fspath(path))

    def dumps(self) -> str:
        """The keyring-file text of this keyring."""
        return "".join(base64.b64encode(key).decode("ascii") + "\n" for key in self._keys)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a keyring file readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(self.dumps())


def _check_size(key: bytes, what: str) -> None:
    if len(key) not in KEY_SIZES:
        raise ValueError(f"{what}: key is {len(key)} bytes; AES keys are 16, 24 or 32 bytes")
