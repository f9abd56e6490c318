"""``SwitchableTransport``: an asyncio transport whose bytes travel over the TCP
connection it was born with or over a pair of shared-memory pipes, switching
between the two at announced byte offsets without losing or reordering one.

Every connection is a TCP connection first (``docs/architecture.md``).  The
TCP side is the loop's own transport (asyncio's or uvloop's), driven by the
``TcpAdapter`` below; the shared-memory side is an ``ShmPath`` (our pipe
producer, our pipe consumer, a doorbell; ``shm_path``).  Each direction
switches on its own: the sender announces over the control link "my stream
continues in the pipe (or back on TCP) from byte N" and moves on; the
receiver delivers exactly N bytes from the old path, then continues from
the new one.  Nothing is ever injected into the TCP byte stream.

The transport is one object composed of one mixin per concern (a method of
the same instance costs nothing more per call; ``state`` declares what they
share): the asyncio contract (``contract``), switching (``switching``), the
read path per side (``tcp_read``, ``pipe_read``), writing (``write``,
``pipe_write``).  The cold parts are objects of their own: the switch state
machine (``switch_state``), the traffic hook and loop watch
(``loop_watch``), the pipe's resize enrollment (``pipe_write.Resizing``).

Until a shared-memory path is attached (most connections, under the default
policy), the loop's TCP transport calls the protocol through the
``TcpAdapter`` with nothing in between: in the loop transport's context,
under its guard, with its messages.  Short connections pay for little more
than one call.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
from collections.abc import Callable
from typing import Any

from aiocoloc import debug
from aiocoloc.control import ControlChannel
from aiocoloc.control.channel import PEER_CLOSE_WAIT
from aiocoloc.control.messages import Close
from aiocoloc.notify.spin import SpinPolicy
from aiocoloc.transport.contract import LifeCycle, ProtocolCalls, reads_into_buffers
from aiocoloc.transport.loop_watch import LoopWatch
from aiocoloc.transport.pipe_read import PipeReadPath
from aiocoloc.transport.pipe_write import PipeWritePath, Resizing
from aiocoloc.transport.shm_path import ShmPath
from aiocoloc.transport.state import DataPath
from aiocoloc.transport.switch_state import SwitchState
from aiocoloc.transport.switching import Switching
from aiocoloc.transport.tcp_read import TcpReadPath
from aiocoloc.transport.tls import let_loop_start_tls
from aiocoloc.transport.write import WritePath

__all__ = ["SwitchableTransport", "TcpAdapter", "open_transport"]


class SwitchableTransport(
    WritePath,
    PipeWritePath,
    TcpReadPath,
    PipeReadPath,
    Switching,
    LifeCycle,
    ProtocolCalls,
):
    """A TCP connection that can carry its bytes through shared memory.

    An ``asyncio.Transport``; built on asyncio's flow-control mixin, which
    ``loop.sendfile()``'s fallback (aiohttp's ``FileResponse``) requires.
    """

    _start_tls_compatible = True
    _sendfile_compatible = asyncio.constants._SendfileMode.FALLBACK

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.BaseProtocol,
        *,
        extra: dict[str, Any] | None = None,
        tcp: asyncio.BaseTransport | None = None,
    ) -> None:
        # _FlowControlMixin's __init__ is not called: its state starts as the
        # class attributes (asyncio's default limits, ``state``), which saves
        # three calls on every connection.
        self._extra = {} if extra is None else extra
        self._loop = loop
        # (The usual protocol answers the first test: no call per connection.)
        buffered = not isinstance(protocol, asyncio.Protocol) and reads_into_buffers(loop, protocol)
        core = self._core = DataPath(self, loop, protocol, contextvars.copy_context(), buffered)
        # The data path's write is ours: one call per write, in C when compiled.
        self.write = core.write  # type: ignore[method-assign]
        self._close_callbacks = []
        debug.live.transports += 1
        if tcp is not None:
            # The loop's TCP transport (asyncio's, or uvloop's, which is not an
            # asyncio.Transport) is our TCP side.
            core.tcp = tcp
            # On TCP alone we close exactly when the loop's transport does, and
            # it knows first when a send failed: drain() asks us on every call,
            # so it asks the loop's transport itself (attach_shm takes this back).
            self.is_closing = tcp.is_closing  # type: ignore[method-assign]

    # ------------------------------------------------------------ set-up

    def attach_shm(self, path: ShmPath, link: ControlChannel) -> None:
        """Give the transport its shared-memory path and control channel (both
        owned from now on); the channel serves the transport from here."""
        if self._shm is not None:
            raise RuntimeError("a shared-memory path is already attached")
        if self._lost_called:  # closed while the path was being set up
            waiting = path.close()  # our ends first: see _release_shared_memory
            try:
                link.post(Close())  # the loss that follows is no error
            except ConnectionResetError:
                pass
            link.close()
            if waiting:
                path.settle(peer_gone=False)
            return
        self._core.set_shm(path)
        self._link = link
        self._switching = SwitchState()
        self._direct = False  # from now on, every callback goes through _call
        core = self._core
        # The data path's own methods from now on (no Python call in between):
        # is_closing (ours again, see __init__), and pausing and resuming,
        # which StreamReader does for every chunk past its limit.
        self.is_closing = core.is_closing  # type: ignore[method-assign]
        self.pause_reading = core.pause_reading  # type: ignore[method-assign]
        self.resume_reading = core.resume_reading  # type: ignore[method-assign]
        if path.spin is not None:
            self._spin = SpinPolicy(path.spin)
        path.doorbell.listen(self._loop, core.on_doorbell, core.may_be_rung)
        if path.resizer is not None:  # an idle new pipe gives its first slices back
            self._resizing = Resizing(path.resizer, self._loop)
            self._resizing.enroll()
        link.serve(self._on_control, self._on_link_lost)

    def _release_shared_memory(self) -> None:
        self._overflow.clear()
        if self._resizing is not None:
            self._resizing.close()
        if self._spin_handle is not None:
            self._spin_handle.cancel()
            self._spin_handle = None
            assert self._spin is not None
            self._spin.release(self._loop)
        # Our pipe ends close before the link: a live peer reads the link's
        # end as "done with the pipes" and may free them at once.
        shm, link = self._shm, self._link
        waiting = shm is not None and shm.close(peer_gone=self._peer_gone)
        if waiting and self._tcp_dropped and link is not None and not link.closed:
            # TCP died under us with the peer's pipe ends still open: a kill -9
            # closes its control socket in the same instant, so wait for that
            # to free the pipes now rather than after the pool's lease.
            assert shm is not None
            link.wait_for_peer_close(
                lambda: shm.settle(peer_gone=True),
                lambda: shm.settle(peer_gone=False),
                PEER_CLOSE_WAIT,
            )
            return
        if link is not None:
            link.close()
        if waiting:
            assert shm is not None
            shm.settle(peer_gone=False)

    # ------------------------------------------------------------ for its owners

    @property
    def lost(self) -> bool:
        """True once the connection is lost (``connection_lost`` called or queued)."""
        return self._lost_called

    def tcp_addresses(self) -> tuple[Any, Any] | None:
        """The TCP connection's ``(peername, sockname)``; None without one."""
        tcp = self._tcp
        if tcp is None:
            return None
        return tcp.get_extra_info("peername"), tcp.get_extra_info("sockname")

    def add_close_callback(self, callback: Callable[[SwitchableTransport], object]) -> None:
        """Call ``callback(transport)`` right after ``connection_lost``."""
        self._close_callbacks.append(callback)

    def note_fallback(self, reason: str, detail: str | None = None) -> None:
        """Record why this connection stays on (or went back to) TCP."""
        self._fallback_reason, self._fallback_detail = reason, detail

    # ------------------------------------------------------------ traffic

    def call_after_traffic(
        self, nbytes: int, callback: Callable[[], None], *, watch: float | None = None
    ) -> None:
        """Call ``callback`` (once, soon) when ``nbytes`` have been written and
        received in all; at once if they already have.  One hook at a time.
        With ``watch``, ``watch_loop(watch)`` starts when the goal is reached,
        so the callback runs even if the application never yields."""
        hooks = self._loop_watch
        if hooks is None:
            hooks = self._loop_watch = LoopWatch()
        self._traffic_goal = hooks.call_after(nbytes, callback, watch)
        if self._tx_pos + self._rx_pos >= self._traffic_goal:
            self._check_traffic()

    def watch_loop(self, period: float | None) -> None:
        """Keep the event loop turning for work this connection waits for
        (an upgrade's handshake), whatever the application's loop shape:
        a writer that kept the loop from running for ``period`` seconds is
        paused for one loop iteration (``loop_watch``).  An application
        that yields by itself is never paused.  ``None`` stops watching."""
        watch = self._loop_watch
        if period is None or self._lost_called:
            if watch is not None:
                self._traffic_goal = watch.stop_watching()
            return
        if watch is None:
            watch = self._loop_watch = LoopWatch()
        self._traffic_goal = watch.watch(period, self._tx_pos + self._rx_pos)

    def _check_traffic(self) -> None:
        """Run what waits for traffic (callers test first on hot paths:
        ``_tx_pos + _rx_pos >= _traffic_goal``)."""
        watch = self._loop_watch
        if watch is not None:
            self._traffic_goal = watch.reached(
                self._tx_pos + self._rx_pos, self._loop, self._context, self._let_loop_run
            )


class TcpAdapter(asyncio.Protocol):
    """The protocol to hand the loop (``create_server``, ``create_connection``,
    ``connect_accepted_socket``): on ``connection_made`` it wraps the loop's
    TCP transport in a ``SwitchableTransport`` carrying the user's protocol,
    and stays the loop transport's protocol, forwarding its events.

    ``transport`` and ``protocol`` are what the user gets; ``on_adopted`` (if
    any) is called with the new transport, e.g. to start an upgrade.

    A friend of ``SwitchableTransport``: its ``data_received`` is the
    transport's data path's (``DataPath.tcp_received``), and in direct mode
    (TCP alone) its EOF sets the transport's receiving state itself.  It
    lives here, beside the class whose state it touches; nothing else does.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        on_adopted: Callable[[SwitchableTransport], None] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._factory = protocol_factory
        self._on_adopted = on_adopted
        self._loop = loop
        self.transport: SwitchableTransport | None = None
        self.protocol: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = self._loop or asyncio.get_running_loop()
        try:
            self.protocol = self._factory()
        except Exception as exc:  # as asyncio's server does: report, drop the connection
            loop.call_exception_handler(
                {"message": "protocol_factory() failed", "exception": exc, "transport": transport}
            )
            transport.abort()  # type: ignore[attr-defined]
            return
        # The loop transport's write buffer limits are left alone: asyncio's
        # and uvloop's start with our high-water mark, so it asks us to pause
        # when we would.
        outer = self.transport = SwitchableTransport(loop, self.protocol, tcp=transport)
        # The loop calls us as it calls connection_made (from a call_soon), so
        # the protocol gets it from here: no second hop, and the loop's guard.
        try:
            self.protocol.connection_made(outer)
        except BaseException:
            if not isinstance(loop, asyncio.BaseEventLoop):
                # uvloop starts reading only once connection_made returned: never, now.
                outer._paused_reading = True
            raise
        # Segments go to the data path with no call in between (direct mode
        # included: DataPath.tcp_received).
        self.data_received = outer._core.tcp_received  # type: ignore[method-assign]
        if self._on_adopted is not None:
            self._on_adopted(outer)

    def data_received(self, data: bytes) -> None:
        # Replaced on the instance by connection_made; a segment before it has
        # no transport to go to.
        outer = self.transport
        assert outer is not None
        outer._core.tcp_received(data)

    def eof_received(self) -> bool:
        outer = self.transport
        assert outer is not None
        core = outer._core
        if core.direct:  # TCP alone: the loop's transport acts on the answer
            outer._tcp_eof_seen = core.rx_eof = True
            keep_open = bool(core.protocol.eof_received())
            if not keep_open:
                core.closing = True  # the loop's transport closes; _tcp_lost follows
            return keep_open
        outer._tcp_eof()
        return True  # half-close: the switchable transport decides when to close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.transport._tcp_lost(exc)

    def pause_writing(self) -> None:
        self.transport._maybe_pause_protocol()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.transport._maybe_resume_protocol()  # type: ignore[union-attr]


async def open_transport(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
) -> tuple[SwitchableTransport, asyncio.BaseProtocol]:
    """Wrap a connected TCP socket in a ``SwitchableTransport`` (TCP mode)."""
    let_loop_start_tls(loop)
    sock.setblocking(False)
    adapter = TcpAdapter(protocol_factory)
    await loop.connect_accepted_socket(lambda: adapter, sock=sock)
    assert adapter.transport is not None and adapter.protocol is not None
    return adapter.transport, adapter.protocol
