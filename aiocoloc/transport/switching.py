"""Switching a ``SwitchableTransport``'s directions, as the control link
carries it: ``switch_tx`` announces ours, ``_on_control`` takes the peer's
messages.  The rules are the state machine's (``switch_state``); this
applies its answers to the transport and keeps the copies its data paths
test (``_tx``, ``_rx``, ``_rx_switch_at``).

The link's messages (``aiocoloc.control.messages``): ``Switch`` (the
sender's stream continues on that path from byte N), answered by
``SwitchAck``, after which the sender may switch again; ``Bell``, a doorbell
ring for peers in different kernels; ``Close``: the sender closes, and the
loss of the link that follows is no error.
"""

from __future__ import annotations

from aiocoloc.control.messages import Bell, Close, Message, Switch, SwitchAck
from aiocoloc.errors import ControlProtocolError, ProtocolViolation
from aiocoloc.notify.doorbell import ControlDoorbell
from aiocoloc.transport import fallback
from aiocoloc.transport.state import TransportState
from aiocoloc.transport.switch_state import NO_SWITCH, SHM, TCP

__all__ = ["Switching"]


class Switching(TransportState):
    """Our direction's switches, and the peer's control messages."""

    @property
    def mode(self) -> str:
        """``"shm"`` when our outgoing bytes go through shared memory, else ``"tcp"``."""
        return self._tx

    @property
    def rx_mode(self) -> str:
        """The path incoming bytes currently come from."""
        return self._rx

    @property
    def tx_finished(self) -> bool:
        """True once ``write_eof()`` was called: our direction carries no more bytes."""
        return self._eof_written or self._eof_pending

    def switch_tx(self, target: str) -> int | None:
        """Send our stream on ``target`` (``"shm"`` or ``"tcp"``) from now on.

        Announces the byte offset where the old path ends and returns it.
        Switches are serialised: until the peer has acknowledged the previous
        announcement (one control round trip), a new switch is deferred --
        taken when the acknowledgement arrives -- and ``None`` is returned.
        Otherwise bytes on the new path could overtake the announcement and
        the peer could not tell where the old path's bytes end.
        """
        if target not in (TCP, SHM):
            raise ValueError(f"unknown path {target!r}")
        state, link = self._switching, self._link
        if self._shm is None or link is None or state is None:
            raise RuntimeError("no shared-memory path is attached")
        if self._eof_written or self._eof_pending:
            raise RuntimeError("cannot switch after write_eof()")
        if self._closing:
            raise RuntimeError("cannot switch a closing transport")
        if state.unacknowledged is not None:
            state.defer(target)
            return None
        if target == self._tx:
            return self._tx_pos
        # To TCP, the pipe ends where the overflow begins.
        offset = self._tx_pos if target == SHM else self._tx_pos - len(self._overflow)
        link.post(Switch(offset, target))
        state.announce(target, offset)
        self._tx = state.tx
        if target == TCP:
            if self._overflow:
                assert self._tcp is not None
                self._tcp.write(bytes(self._overflow))
                self._overflow.clear()
            self._waiting_space = False
            # A writer paused for the overflow: resumed now unless the loop's
            # transport took over the pause (it resumes it when it drains).
            self._maybe_resume_protocol()
        self.switches += 1
        return offset

    def _on_control(self, message: Message) -> None:
        """A message on the control link (``ControlChannel.serve``)."""
        if isinstance(message, Bell):
            doorbell = self._shm.doorbell if self._shm is not None else None
            if isinstance(doorbell, ControlDoorbell):
                doorbell.on_ring()
        elif isinstance(message, SwitchAck):
            self._on_switch_ack(message.offset)
        elif isinstance(message, Switch):
            self._on_switch(message)
        elif isinstance(message, Close):
            self._peer_closed_link = True  # a graceful close: its loss is no error
        else:  # a handshake message on the link
            self._fatal_error(
                ConnectionResetError(f"peer sent {message.OP!r} on the control link"),
                "protocol violation",
            )

    def _on_switch(self, message: Switch) -> None:
        state = self._switching
        assert state is not None and self._link is not None
        offset = message.offset
        try:
            state.announced(offset, message.to, self._rx_pos)
        except ProtocolViolation:
            self._fatal_error(
                ConnectionResetError(f"peer announced an impossible switch: {message!r:.80}"),
                "protocol violation",
            )
            return
        self._rx_switch_at = state.next_rx_switch
        try:
            self._link.post(SwitchAck(offset))
        except ConnectionResetError:
            pass  # reported by the link's own loss
        self._advance_rx()

    def _on_switch_ack(self, offset: int) -> None:
        state = self._switching
        assert state is not None
        try:
            target = state.acknowledged(offset)
        except ProtocolViolation as exc:
            self._fatal_error(ConnectionResetError(str(exc)), "protocol violation")
            return
        self._tx = state.tx
        if target is None or self._closing or self._eof_written or self._eof_pending:
            return  # a switch deferred before close() or write_eof() is dropped: they end the stream where it is
        self.switch_tx(target)

    def _advance_rx(self) -> None:
        """Take pending switches whose offset is reached, then feed the new path."""
        state = self._switching
        assert state is not None
        self._rx = state.reach(self._rx_pos)
        self._rx_switch_at = state.next_rx_switch
        self._sync_tcp_reading()
        if self._rx == SHM:
            self._schedule_drain()
        else:
            self._feed_tcp()

    def _on_link_lost(self, exc: BaseException | None) -> None:
        if self._lost_called or self._closing or self._peer_closed_link:
            return
        if isinstance(exc, ControlProtocolError):
            # A live peer that breaks the protocol: its byte offsets cannot
            # be trusted either, whichever path the bytes take now.
            self._fatal_error(
                ConnectionResetError(f"peer broke the control protocol: {exc}"),
                "protocol violation",
            )
            return
        if self._tx == SHM or self._rx == SHM or self._rx_switch_at != NO_SWITCH:
            self._peer_gone = True
            self._fatal_error(
                ConnectionResetError("the peer's control channel closed (peer process or VM gone)"),
                "peer lost",
            )
            return
        # Both directions still on TCP: the connection goes on without shared memory.
        shm, self._shm, self._link = self._shm, None, None
        if shm is not None and shm.close():
            shm.settle(peer_gone=False)  # the peer frees what it still holds when it closes
        fallback.record(self, fallback.PROTOCOL_ERROR, f"control channel lost: {exc}")
