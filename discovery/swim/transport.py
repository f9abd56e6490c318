"""The network under the SWIM engine: one UDP socket and one TCP listener
on the same port.

UDP carries probes and gossip, one packet (``packet.py``) a datagram.  TCP
carries what must arrive whole or may be large: push/pull state exchanges
and fallback probes, one request frame and one reply frame a connection.
Everything that arrives is opened and decoded here, so every drop is
counted in one place (``drop_<reason>`` in the shared counters) and the
engine only ever sees well-formed messages.

``block`` is fault injection: packets and connections to and from the
blocked IPs are dropped as if the network had partitioned (tests and
drills, where network namespaces are not an option).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from discovery.member import join_host, split_host
from discovery.swim.messages import Message, MessageError, decode_body
from discovery.swim.packet import FRAME_HEADER, MAX_FRAME, MAX_PACKET, PacketError, Sealer

__all__ = ["PacketHandler", "StreamHandler", "Transport"]

_log = logging.getLogger("discovery.swim.transport")

#: Handles the messages of one datagram from "ip:port".
PacketHandler = Callable[[list[Message], str], None]
#: Handles the messages of one TCP request; returns the reply body or None.
StreamHandler = Callable[[list[Message], str], Awaitable[bytes | None]]

_BIND_ATTEMPTS = 20


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: Transport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._owner._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable of an earlier send: the peer is gone, which
        # probing finds out on its own.
        self._owner.stats["udp_error"] += 1
        _log.debug("UDP error: %s", exc)


class Transport:
    """UDP and TCP on one address; counts what it sends, receives, drops."""

    def __init__(
        self,
        sealer: Sealer,
        stats: Counter[str],
        on_packet: PacketHandler,
        on_stream: StreamHandler,
        tcp_timeout: float,
    ) -> None:
        self.sealer = sealer
        self.stats = stats
        self._on_packet = on_packet
        self._on_stream = on_stream
        self._tcp_timeout = tcp_timeout
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._bind_ip = ""
        self._blocked: frozenset[str] = frozenset()
        self._streams: set[asyncio.Task[None]] = set()

    # -- life cycle -------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Bind UDP and TCP to ``host:port`` (0: any free port, the same for
        both); returns the port."""
        loop = asyncio.get_running_loop()
        self._bind_ip = host
        for _attempt in range(_BIND_ATTEMPTS if port == 0 else 1):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), local_addr=(host, port)
            )
            bound = udp.get_extra_info("sockname")[1]
            try:
                self._server = await asyncio.start_server(
                    self._serve, host, bound, reuse_address=True, backlog=128
                )
            except OSError as exc:
                udp.close()
                if port != 0 or exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self._udp = udp
            return int(bound)
        raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is not None:
            self._server.close()
            for task in list(self._streams):
                task.cancel()
            await asyncio.gather(*self._streams, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    # -- fault injection ----------------------------------------------------

    def block(self, ips: Iterable[str]) -> None:
        """Drop all traffic to and from these IPs (empty: heal)."""
        self._blocked = frozenset(split_host(join_host(ip, 1))[0] or ip for ip in ips)
        _log.info("blocking %s", sorted(self._blocked) or "nothing")

    @property
    def blocked(self) -> frozenset[str]:
        return self._blocked

    def _is_blocked(self, addr: str) -> bool:
        return bool(self._blocked) and split_host(addr)[0] in self._blocked

    # -- UDP --------------------------------------------------------------

    def send(self, addr: str, body: bytes) -> bool:
        """Send one packet of ``body`` to ``"ip:port"``; False if it was not
        sent (too large, closed, blocked, unreachable)."""
        ip, port = split_host(addr)
        if self._udp is None or not port:
            return False
        if self._is_blocked(addr):
            self.stats["drop_blocked"] += 1
            return False
        packet = self.sealer.seal(body)
        if len(packet) > MAX_PACKET:
            _log.error("not sending a %d-byte packet to %s", len(packet), addr)
            self.stats["send_oversize"] += 1
            return False
        self._udp.sendto(packet, (ip, port))
        self.stats["udp_out"] += 1
        self.stats["udp_out_bytes"] += len(packet)
        return True

    def _on_datagram(self, data: bytes, raw_addr: tuple[Any, ...]) -> None:
        addr = join_host(str(raw_addr[0]), int(raw_addr[1]))
        self.stats["udp_in"] += 1
        self.stats["udp_in_bytes"] += len(data)
        if self._is_blocked(addr):
            self.stats["drop_blocked"] += 1
            return
        messages = self._open(data, MAX_PACKET, addr)
        if messages is None:
            return
        try:
            self._on_packet(messages, addr)
        except Exception:  # a handler bug must not take the socket down
            self.stats["handler_error"] += 1
            _log.exception("handling a packet from %s", addr)

    def _open(self, data: bytes, limit: int, addr: str) -> list[Message] | None:
        try:
            messages, unknown = decode_body(self.sealer.open(data, limit))
        except PacketError as exc:
            self.stats[f"drop_{exc.reason}"] += 1
            _log.debug("dropped a packet from %s: %s", addr, exc)
            return None
        except MessageError as exc:
            self.stats["drop_malformed"] += 1
            _log.debug("dropped a packet from %s: %s", addr, exc)
            return None
        if unknown:
            self.stats["drop_unknown"] += unknown
        return messages

    # -- TCP --------------------------------------------------------------

    async def request(self, addr: str, body: bytes, timeout: float) -> list[Message]:
        """Send ``body`` over a new TCP connection and return the reply's
        messages; ``OSError``/``TimeoutError`` if the peer cannot be had,
        ``ConnectionError`` if it answered nothing usable."""
        ip, port = split_host(addr)
        if not port:
            raise ConnectionError(f"bad address {addr!r}")
        if self._is_blocked(addr):
            self.stats["drop_blocked"] += 1
            raise ConnectionRefusedError(f"{addr} is blocked")
        local = (self._bind_ip, 0) if self._bind_ip not in ("", "0.0.0.0", "::") else None
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(ip, port, local_addr=local)
            try:
                self._write_frame(writer, body)
                await writer.drain()
                reply = await self._read_frame(reader, addr)
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
        if reply is None:
            raise ConnectionError(f"no usable reply from {addr}")
        return reply

    def _write_frame(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        packet = self.sealer.seal(body)
        writer.write(FRAME_HEADER.pack(len(packet)) + packet)
        self.stats["tcp_out"] += 1
        self.stats["tcp_out_bytes"] += FRAME_HEADER.size + len(packet)

    async def _read_frame(self, reader: asyncio.StreamReader, addr: str) -> list[Message] | None:
        try:
            (length,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
            if length > MAX_FRAME:
                self.stats["drop_oversize"] += 1
                return None
            data = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            self.stats["drop_truncated"] += 1
            return None
        self.stats["tcp_in"] += 1
        self.stats["tcp_in_bytes"] += FRAME_HEADER.size + len(data)
        return self._open(data, MAX_FRAME, addr)

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_one(reader, writer))
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        addr = join_host(str(peer[0]), int(peer[1])) if peer else "?:0"
        try:
            if self._is_blocked(addr):
                self.stats["drop_blocked"] += 1
                return
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(self._tcp_timeout):
                messages = await self._read_frame(reader, addr)
                if messages is None:
                    return
                reply = await self._on_stream(messages, addr)
                if reply is not None:
                    self._write_frame(writer, reply)
                    await writer.drain()
        except (OSError, TimeoutError) as exc:
            _log.debug("TCP exchange with %s: %s", addr, exc)
        except Exception:
            self.stats["handler_error"] += 1
            _log.exception("handling a TCP request from %s", addr)
        finally:
            writer.close()
