"""The local API's wire format: requests, replies, events, and every way a
request can be wrong."""

from __future__ import annotations

import json

import pytest

from discovery.api_messages import (
    API_VERSION,
    MAX_LINE,
    OPS,
    ApiError,
    Colocation,
    MemberView,
    PoolInfo,
    Reply,
    decode_request,
    decode_server_line,
    encode_error,
    encode_event,
    encode_request,
    encode_result,
)
from discovery.events import Event
from discovery.member import Member, Status

A = Member("a", ("127.0.0.2:7946",), frozenset({"p1"}), ("tcp:127.0.0.2:9000",), 3)


def test_every_op_round_trips() -> None:
    samples = {"address": "10.0.0.1:80", "name": "pool-a", "endpoints": ["tcp:1.2.3.4:5"]}
    for op, spec in OPS.items():
        args = {name: samples[name] for name in spec}
        line = encode_request(op, 7, **args)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        request = decode_request(line)
        assert (request.op, dict(request.args), request.id) == (op, args, 7)


def test_operator_shorthand() -> None:
    """What someone types into socat: no id, no version."""
    request = decode_request(b'{"op": "colocated", "address": "10.1.2.3"}\n')
    assert request.id is None and request.args == {"address": "10.1.2.3"}


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"not json\n", "bad-request", "not JSON"),
        (b"\xff\xfe\n", "bad-request", "not JSON"),
        (b"[1, 2]\n", "bad-request", "JSON object"),
        (b'{"id": 1}\n', "bad-request", "'op' is missing"),
        (b'{"op": 5}\n', "bad-request", "'op' is missing or not a string"),
        (b'{"op": "reboot"}\n', "unknown-op", "unknown op 'reboot'"),
        (b'{"op": "colocated"}\n', "bad-request", "missing argument 'address'"),
        (b'{"op": "colocated", "address": 7}\n', "bad-request", "'address' must be"),
        (b'{"op": "colocated", "address": ""}\n', "bad-request", "'address' must be"),
        (b'{"op": "members", "verbose": true}\n', "bad-request", "unknown argument 'verbose'"),
        (b'{"op": "advertise", "endpoints": "x"}\n', "bad-request", "'endpoints' must be"),
        (b'{"op": "advertise", "endpoints": [""]}\n', "bad-request", "'endpoints' must be"),
        (b'{"op": "members", "id": [1]}\n', "bad-request", "'id' must be"),
        (b'{"op": "members", "id": true}\n', "bad-request", "'id' must be"),
        (b'{"op": "members", "v": "1"}\n', "bad-request", "'v' must be an integer"),
        (b'{"op": "members", "v": 99}\n', "unsupported-version", "speaks API version 1"),
    ],
)
def test_bad_requests(line: bytes, code: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        decode_request(line)
    assert caught.value.code == code
    assert words in caught.value.message


def test_error_keeps_the_request_id() -> None:
    with pytest.raises(ApiError) as caught:
        decode_request(b'{"op": "nope", "id": "abc"}\n')
    reply = decode_server_line(encode_error(caught.value))
    assert isinstance(reply, Reply) and not reply.ok
    assert reply.id == "abc" and reply.error is not None and reply.error.code == "unknown-op"


def test_too_long_line() -> None:
    line = encode_request("colocated", 1, address="x" * MAX_LINE)
    with pytest.raises(ApiError, match="longer than"):
        decode_request(line)


def test_replies_and_events() -> None:
    reply = decode_server_line(encode_result(4, {"subscribed": True}))
    assert reply == Reply(4, True, {"subscribed": True})
    event = Event("update", A.with_status(Status.ALIVE), A)
    assert decode_server_line(encode_event(event)) == event
    failed = Event("failed", A.with_status(Status.FAILED))
    decoded = decode_server_line(encode_event(failed))
    assert isinstance(decoded, Event) and decoded.member.status is Status.FAILED


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": {"kind": "explode", "member": {}}}\n',
        b'{"event": {"kind": "join", "member": {"node": ""}}}\n',
        b'{"ok": "yes"}\n',
        b"[]\n",
    ],
)
def test_garbage_from_the_server(line: bytes) -> None:
    with pytest.raises(ApiError):
        decode_server_line(line)


def test_result_shapes_round_trip() -> None:
    view = MemberView(A, False, frozenset({"p1"}))
    assert view.colocated
    assert MemberView.from_json(json.loads(json.dumps(view.to_json()))) == view
    assert not MemberView(A.with_status(Status.FAILED), False, frozenset({"p1"})).colocated
    assert MemberView(A, True, frozenset()).colocated  # ourselves
    answer = Colocation(True, "p1", frozenset({"p1"}), A, A.endpoints, False)
    assert Colocation.from_json(json.loads(json.dumps(answer.to_json()))) == answer
    pool = PoolInfo("pool-a", "p1", "posix", 1 << 20, 2, "config")
    assert PoolInfo.from_json(pool.to_json()) == pool
    with pytest.raises(ApiError):
        PoolInfo.from_json({**pool.to_json(), "size": "big"})
    assert API_VERSION == 1
