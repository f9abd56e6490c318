"""The switch state machine (``aiocoloc.transport.switch_state``) without
sockets: our direction's announcements, acknowledgements and deferred
switches; the peer's announcements, validated and taken at their offsets."""

from __future__ import annotations

import pytest

from aiocoloc.errors import ProtocolViolation
from aiocoloc.transport.switch_state import (
    NO_SWITCH,
    RX_TRANSITIONS,
    SHM,
    TCP,
    TX_TRANSITIONS,
    SwitchState,
)


def test_both_directions_start_on_tcp() -> None:
    state = SwitchState()
    assert (state.tx, state.rx, state.tx_state) == (TCP, TCP, TCP)
    assert state.unacknowledged is None and state.deferred is None
    assert state.next_rx_switch == NO_SWITCH


def test_the_tables_go_back_and_forth() -> None:
    assert RX_TRANSITIONS == {TCP: SHM, SHM: TCP}
    # Each state has exactly one way on, and four steps lead back to TCP.
    state, events = TCP, ["announce", "acknowledged"] * 2
    for event in events:
        state = TX_TRANSITIONS[(state, event)]
    assert state == TCP
    assert len(TX_TRANSITIONS) == 4


def test_an_announced_switch_moves_at_once_and_waits_for_its_acknowledgement() -> None:
    state = SwitchState()
    state.announce(SHM, 100)
    assert state.tx == SHM and state.unacknowledged == 100
    assert state.tx_state != SHM  # on its way
    assert state.acknowledged(100) is None
    assert state.tx_state == SHM and state.unacknowledged is None
    state.announce(TCP, 250)
    assert state.tx == TCP
    assert state.acknowledged(250) is None
    assert state.tx_state == TCP


def test_a_switch_asked_for_meanwhile_is_deferred_until_the_acknowledgement() -> None:
    state = SwitchState()
    state.announce(SHM, 0)
    state.defer(TCP)
    assert state.acknowledged(0) == TCP  # due now
    assert state.deferred is None
    state.announce(TCP, 10)
    state.defer(SHM)
    state.defer(TCP)  # the last request wins: where we are already
    assert state.acknowledged(10) is None


def test_our_own_impossible_moves_raise() -> None:
    state = SwitchState()
    with pytest.raises(RuntimeError):
        state.announce(TCP, 0)  # already there
    with pytest.raises(RuntimeError):
        state.defer(SHM)  # nothing in flight
    state.announce(SHM, 0)
    with pytest.raises(RuntimeError):
        state.announce(TCP, 5)  # not acknowledged yet


@pytest.mark.parametrize("offset", [None, 99, "100", 101])
def test_an_unknown_acknowledgement_is_the_peer_s_violation(offset: object) -> None:
    state = SwitchState()
    state.announce(SHM, 100)
    with pytest.raises(ProtocolViolation):
        state.acknowledged(offset)
    assert state.unacknowledged == 100  # unchanged


def test_an_acknowledgement_of_nothing_changes_nothing() -> None:
    state = SwitchState()
    assert state.acknowledged(None) is None
    with pytest.raises(ProtocolViolation):
        state.acknowledged(0)
    assert state.tx_state == TCP


def test_incoming_switches_are_taken_at_their_offsets_in_order() -> None:
    state = SwitchState()
    state.announced(10, SHM, rx_pos=0)
    state.announced(30, TCP, rx_pos=0)
    state.announced(30, SHM, rx_pos=0)  # an empty TCP segment
    assert state.next_rx_switch == 10
    assert state.reach(5) == TCP
    assert state.reach(10) == SHM
    assert state.next_rx_switch == 30
    assert state.reach(30) == SHM  # both switches at 30 taken
    assert state.next_rx_switch == NO_SWITCH


@pytest.mark.parametrize(
    ("offset", "target"),
    [
        (10, TCP),  # already there
        (10, "udp"),
        ("10", SHM),
        (None, SHM),
        (4, SHM),  # behind what was received
    ],
)
def test_impossible_incoming_switches_are_violations(offset: object, target: object) -> None:
    state = SwitchState()
    with pytest.raises(ProtocolViolation):
        state.announced(offset, target, rx_pos=5)
    assert state.next_rx_switch == NO_SWITCH


def test_an_incoming_switch_is_checked_against_the_last_one_pending() -> None:
    state = SwitchState()
    state.announced(10, SHM, rx_pos=0)
    with pytest.raises(ProtocolViolation):
        state.announced(20, SHM, rx_pos=0)  # the same path twice
    with pytest.raises(ProtocolViolation):
        state.announced(5, TCP, rx_pos=0)  # before the pending one
    state.announced(20, TCP, rx_pos=0)
    assert state.reach(20) == TCP
