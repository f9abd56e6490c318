"""What waits for the answers of a Serf agent: a request (``Call``) or a
stream of records under one ``Seq`` (``RecordStream``).

The connection's reader hands each a response header's ``Error`` and, when
``expects_body`` says one follows, the body; ``deliver`` returns True once
the ``Seq`` is finished with.  ``fail`` ends either when the connection is
lost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from discovery.serf.wire import SerfProtocolError, StreamGap, agent_error, has_body

__all__ = ["STREAM_LIMIT", "Call", "RecordStream"]

_log = logging.getLogger("discovery.serf.rpc")

#: Records a stream holds for a consumer that does not keep up.
STREAM_LIMIT = 1024

T = TypeVar("T")


class Call:
    """A request waiting for its one response."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.future: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()

    def expects_body(self, error: str) -> bool:
        return has_body(self.command, error)

    def deliver(self, error: str, body: Any) -> bool:
        if not self.future.done():
            self.future.set_result((error, body))
        return True  # done: forget the Seq

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # nobody may be waiting any more: no "never retrieved"


class RecordStream(Generic[T]):
    """The records the agent keeps sending under one ``Seq``.

    Iterate it (``async for``) or ``await get()``; ``close()`` it when done
    with it.  It ends (``EOFError`` from ``get``, the end of iteration) when a
    query is done or the stream was closed, and with ``SerfConnectionError``
    when the connection is lost."""

    def __init__(
        self,
        command: str,
        seq: int,
        parse: Callable[[Any], T | None],
        *,
        gap: Callable[[int], T] | None = None,
        limit: int = STREAM_LIMIT,
        on_close: Callable[[RecordStream[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.command = command
        self._on_close = on_close
        self.seq = seq
        self._parse = parse
        self._gap = gap
        self._limit = limit
        self._records: collections.deque[T] = collections.deque()
        self._gap_record: T | None = None  # the gap marker at the tail, if any
        self._wakeup = asyncio.Event()
        self._ended: BaseException | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.dropped = 0  # records lost because the consumer fell behind
        self.closed = False

    # -- the reader's side

    def expects_body(self, error: str) -> bool:
        # The first answer is a bare header; every record after it has a body.
        return self.started.done()

    def deliver(self, error: str, body: Any) -> bool:
        if not self.started.done():
            if error:
                self.started.set_exception(agent_error(self.command, error))
                self.started.exception()
                return True
            self.started.set_result(None)
            return False
        try:
            record = self._parse(body)
        except SerfProtocolError as exc:
            _log.warning("unreadable %s record skipped: %s", self.command, exc)
            if not self.closed:
                self._overflow()
            return False
        if record is None:  # a query's "done"
            self._end(EOFError(f"{self.command} done"))
            return True
        if self.closed:
            return False  # records still in flight after close(): drop them
        if len(self._records) >= self._limit:
            self._overflow()
        else:
            self._records.append(record)
            self._gap_record = None
        self._wakeup.set()
        return False

    def _overflow(self) -> None:
        self.dropped += 1
        if self._gap is None:
            return
        if self._gap_record is not None and self._records and self._records[-1] is self._gap_record:
            self._records.pop()
            count = self._gap_record.dropped + 1 if isinstance(self._gap_record, StreamGap) else 1
        else:
            count = 1
        self._gap_record = self._gap(count)
        self._records.append(self._gap_record)
        self._wakeup.set()

    def fail(self, exc: BaseException) -> None:
        if not self.started.done():
            self.started.set_exception(exc)
            self.started.exception()
        self._end(exc)

    def _end(self, exc: BaseException) -> None:
        if self._ended is None:
            self._ended = exc
            self._wakeup.set()

    # -- the consumer's side

    async def get(self, timeout: float | None = None) -> T:
        """The next record; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not self._records:
                if self._ended is not None:
                    raise self._ended
                self._wakeup.clear()
                await self._wakeup.wait()
        return self._records.popleft()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.get()
            except EOFError:
                return

    async def close(self) -> None:
        """Stop the stream at the agent (``stop``) unless it has ended."""
        if self.closed:
            return
        self.closed = True
        self._records.clear()
        self._end(EOFError(f"{self.command} stream closed"))
        if self._on_close is not None:
            await self._on_close(self)
