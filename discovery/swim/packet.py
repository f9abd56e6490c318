"""How a body of messages becomes one datagram (or one TCP frame), and back.

Layout::

    magic "SW" | version u8 | flags u8 | payload

- sealed (flag 1, a keyring is configured): payload is a 12-byte random
  nonce followed by AES-GCM(primary key, body), whose 16-byte tag
  authenticates the body *and* the 4 header bytes (associated data).  Every
  key of the ring is tried to open it, so a key can be rotated in.
- plain (no keyring): payload is the body followed by the CRC-32 of header
  and body, so that a corrupted or truncated packet is still caught.

A member with a keyring drops plain packets and one without drops sealed
ones: both count as unauthenticated.  Over TCP a frame is a big-endian u32
length followed by one such packet.
"""

from __future__ import annotations

import os
import struct
import zlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from discovery.keys import Keyring
from discovery.swim.messages import PROTOCOL_MIN, PROTOCOL_VERSION

__all__ = [
    "FRAME_HEADER",
    "MAX_FRAME",
    "MAX_PACKET",
    "PacketError",
    "Sealer",
]

#: Largest datagram sent or accepted (memberlist's UDPBufferSize).
MAX_PACKET = 1400
#: Largest TCP frame accepted (a push/pull of tens of thousands of members).
MAX_FRAME = 8 << 20
#: The length prefix of a TCP frame.
FRAME_HEADER = struct.Struct("!I")

_MAGIC = b"SW"
_HEADER = struct.Struct("!2sBB")
_FLAG_SEALED = 0x01
_NONCE = 12
_TAG = 16
_CRC = struct.Struct("!I")


class PacketError(ValueError):
    """A packet to drop; ``reason`` names the ``drop_*`` counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Sealer:
    """Seals bodies into packets and opens packets into bodies."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring
        self._ciphers = [AESGCM(key) for key in keyring.keys] if keyring else []
        self._flags = _FLAG_SEALED if keyring else 0
        self._header = _HEADER.pack(_MAGIC, PROTOCOL_VERSION, self._flags)

    def rekey(self, keyring: Keyring) -> None:
        """Use ``keyring`` from now on (rotation); only a sealer that has
        keys can change them: turning sealing on or off would split the
        cluster in two."""
        if not self._ciphers:
            raise ValueError("packets are not sealed; restart with a keyring to seal them")
        self._ciphers = [AESGCM(key) for key in keyring.keys]
        self.keyring = keyring

    @property
    def overhead(self) -> int:
        """Bytes a packet adds to its body."""
        return _HEADER.size + (_NONCE + _TAG if self._ciphers else _CRC.size)

    def seal(self, body: bytes) -> bytes:
        if self._ciphers:
            nonce = os.urandom(_NONCE)
            return self._header + nonce + self._ciphers[0].encrypt(nonce, body, self._header)
        head = self._header + body
        return head + _CRC.pack(zlib.crc32(head))

    def open(self, packet: bytes, limit: int = MAX_PACKET) -> bytes:
        """The body of ``packet``; ``PacketError`` if it is to be dropped."""
        if len(packet) > limit:
            raise PacketError("oversize", f"{len(packet)} bytes > {limit}")
        if len(packet) < _HEADER.size:
            raise PacketError("truncated", f"{len(packet)} bytes")
        magic, version, flags = _HEADER.unpack_from(packet)
        if magic != _MAGIC or flags & ~_FLAG_SEALED:
            raise PacketError("malformed", "not a SWIM packet")
        if not PROTOCOL_MIN <= version <= PROTOCOL_VERSION:
            raise PacketError("version", f"protocol version {version}")
        header = packet[: _HEADER.size]
        if (flags & _FLAG_SEALED) != self._flags:
            raise PacketError("auth", "sealed" if flags else "not sealed")
        if not self._ciphers:
            if len(packet) < _HEADER.size + _CRC.size + 1:
                raise PacketError("truncated", f"{len(packet)} bytes")
            (crc,) = _CRC.unpack_from(packet, len(packet) - _CRC.size)
            if zlib.crc32(packet[: -_CRC.size]) != crc:
                raise PacketError("malformed", "checksum mismatch")
            return packet[_HEADER.size : -_CRC.size]
        if len(packet) < _HEADER.size + _NONCE + _TAG + 1:
            raise PacketError("truncated", f"{len(packet)} bytes")
        nonce = packet[_HEADER.size : _HEADER.size + _NONCE]
        sealed = packet[_HEADER.size + _NONCE :]
        for cipher in self._ciphers:
            try:
                return cipher.decrypt(nonce, sealed, header)
            except InvalidTag:
                continue
        raise PacketError("auth", "no key opens it")
