"""The steps both sides of an upgrade handshake take, within one kernel
(``aiocoloc.connect.handshake``) or between kernels
(``aiocoloc.connect.remote_handshake``): sending and receiving messages with
failures turned into ``HandshakeFailed``, checking what came, writing and
reading the nonces that prove a pool is shared, creating pipes, refusing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from aiocoloc.control import ControlChannel
from aiocoloc.control.messages import NONCE_SIZE, Message, PipeRef, Refuse
from aiocoloc.errors import (
    ControlChannelClosed,
    ControlProtocolError,
    HandshakeAbandoned,
    HandshakeFailed,
    PoolError,
    PoolExhausted,
    RingError,
    VersionMismatch,
)
from aiocoloc.shm import PipeHandle, Pool
from aiocoloc.transport import fallback

if TYPE_CHECKING:
    from aiocoloc.connect.agreement import Agreement

__all__ = [
    "INITIAL_SHARE",
    "INITIAL_SLICES",
    "REFUSE_TIMEOUT",
    "close_all",
    "expect",
    "new_pipe",
    "pipe_ref",
    "read_nonce",
    "receive",
    "refuse",
    "send",
    "serve_or_refuse",
    "write_nonce",
]

#: Slices a new pipe starts with, largest first: a busy pipe should not wait
#: for the elastic policy to be useful, a crowded pool still gets a pipe.
INITIAL_SLICES = (16, 4, 1)
#: A new pipe starts with at most this share of the free slices, so that the
#: connections after it find room too (busy pipes grow by demand later).
INITIAL_SHARE = 1 / 32
#: Seconds a refusal may take to send before the server gives up on it.
REFUSE_TIMEOUT = 1.0
M = TypeVar("M", bound=Message)


async def send(
    channel: ControlChannel, message: Message, fds: list[int] | tuple[int, ...] = ()
) -> None:
    try:
        await channel.send(message, fds)
    except ControlChannelClosed as exc:
        raise HandshakeAbandoned(fallback.PROTOCOL_ERROR, str(exc)) from None


async def receive(channel: ControlChannel) -> tuple[Message, list[int]]:
    """The next message; what goes wrong on the channel as ``HandshakeFailed``."""
    try:
        return await channel.recv()
    except ControlChannelClosed as exc:
        raise HandshakeAbandoned(fallback.PROTOCOL_ERROR, str(exc)) from None
    except VersionMismatch as exc:
        raise HandshakeFailed(fallback.VERSION_MISMATCH, str(exc)) from None
    except ControlProtocolError as exc:
        raise HandshakeFailed(fallback.PROTOCOL_ERROR, str(exc)) from None


def expect(message: Message, fds: list[int], kind: type[M], nfds: int) -> M:
    """``message`` as a ``kind`` that came with ``nfds`` descriptors (else
    they are closed and the handshake fails: with the peer's reason if it
    refused)."""
    if isinstance(message, Refuse):
        close_all(fds)
        reason = message.reason if message.reason in fallback.REASONS else fallback.PROTOCOL_ERROR
        raise HandshakeFailed(reason, f"peer refused: {message.detail or reason}")
    if not isinstance(message, kind):
        close_all(fds)
        raise HandshakeFailed(fallback.PROTOCOL_ERROR, f"expected {kind.OP!r}, got {message.OP!r}")
    if len(fds) != nfds:
        close_all(fds)
        raise HandshakeFailed(
            fallback.PROTOCOL_ERROR,
            f"{kind.OP!r} came with {len(fds)} descriptors, expected {nfds}",
        )
    return message


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def pipe_ref(handle: PipeHandle) -> PipeRef:
    return (handle.slot, handle.generation)


def write_nonce(pool: Pool, handle: PipeHandle, nonce: bytes) -> None:
    try:
        producer = pool.pipe_producer(handle)
    except (PoolError, RingError, ValueError) as exc:
        raise HandshakeFailed(fallback.PROOF_FAILED, f"cannot write our pipe: {exc}") from None
    try:
        if not producer.write_all(nonce):
            raise HandshakeFailed(fallback.PROOF_FAILED, "no room for the nonce in a new pipe")
    finally:
        producer.release()


def read_nonce(pool: Pool, handle: PipeHandle) -> bytes:
    try:
        consumer = pool.pipe_consumer(handle)
    except (PoolError, RingError, ValueError) as exc:
        raise HandshakeFailed(
            fallback.PROOF_FAILED, f"cannot read the peer's pipe: {exc}"
        ) from None
    try:
        got = bytearray(NONCE_SIZE)
        n = consumer.readinto(got)
        if n != NONCE_SIZE:
            raise HandshakeFailed(
                fallback.PROOF_FAILED, f"found {n or 0} nonce bytes in the pipe, not {NONCE_SIZE}"
            )
        return bytes(got)
    finally:
        consumer.release()


def new_pipe(pool: Pool, producer: int, consumer: int) -> PipeHandle:
    failure: PoolExhausted | None = None
    room = pool.free_slice_count() * INITIAL_SHARE
    for initial in INITIAL_SLICES:
        if initial > pool.geometry.max_slices_per_pipe or (initial > 1 and initial > room):
            continue
        try:
            return pool.create_pipe(producer, consumer, initial=initial)
        except PoolExhausted as exc:
            failure = exc
    assert failure is not None
    raise failure


async def serve_or_refuse(
    agreement: Agreement, steps: Coroutine[Any, Any, Any]
) -> tuple[Any, Agreement]:
    """Run a server's ``steps`` (they return our transport of the connection)
    for ``agreement``: a failure is told to the client (unless it hung up)
    and everything given back."""
    try:
        try:
            transport = await steps
        except HandshakeAbandoned:
            raise
        except HandshakeFailed as failed:
            await refuse(agreement.channel, failed)
            raise
        return transport, agreement
    except BaseException:
        agreement.release()
        raise


async def refuse(channel: ControlChannel, failed: HandshakeFailed) -> None:
    """Tell the client why (bounded: it may not be reading)."""
    try:
        await asyncio.wait_for(
            channel.send(Refuse(failed.reason, failed.detail[:1024])), REFUSE_TIMEOUT
        )
    except (TimeoutError, ControlChannelClosed):
        pass
