"""Policy input: ``configure()`` and the environment refuse what they cannot
use with an error that names the setting (or variable) and the value."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import aiocoloc
from aiocoloc.connect import policy
from aiocoloc.transport import fallback

from .test_connect import FakeControl, fell_back, info, stall
from .test_transport import run


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        ("handshake_timeout", "2", TypeError),
        ("handshake_timeout", True, TypeError),
        ("handshake_timeout", None, TypeError),
        ("handshake_timeout", float("inf"), ValueError),
        ("handshake_timeout", float("nan"), ValueError),
        ("handshake_timeout", 0, ValueError),
        ("handshake_timeout", -1.5, ValueError),
        ("pool_size", True, TypeError),
        ("pool_size", "67108864", TypeError),
        ("pool_size", float(64 << 20), TypeError),
        ("pool_size", policy.MIN_POOL_SIZE - 1, ValueError),
        ("upgrade", "\uff16\uff14", ValueError),  # full-width digits
        ("upgrade", "²", ValueError),
        ("upgrade", True, ValueError),
        ("trust", "uids:\uff11\uff10\uff10\uff10", ValueError),  # full-width digits
        ("trust", "uids:-1", ValueError),
        ("hub_linger", "5", TypeError),
        ("hub_linger", True, TypeError),
        ("hub_linger", -1, ValueError),
        ("hub_linger", float("inf"), ValueError),
        ("hub_linger", float("nan"), ValueError),
    ],
)
def test_configure_refuses_with_an_error_naming_the_setting(
    setting: str, value: Any, error: type[Exception]
) -> None:
    before = policy.current()
    with pytest.raises(error, match=setting if setting != "trust" else "trust uids"):
        aiocoloc.configure(**{setting: value})
    assert policy.current() == before  # nothing changed


def test_configure_takes_good_values() -> None:
    settings = aiocoloc.configure(
        handshake_timeout=1,
        pool_size=policy.MIN_POOL_SIZE,
        upgrade="64",
        trust="uids:0, 7",
        hub_linger=0,
    )
    assert settings.hub_linger == 0.0 and isinstance(settings.hub_linger, float)
    assert settings.handshake_timeout == 1.0 and isinstance(settings.handshake_timeout, float)
    assert settings.pool_size == policy.MIN_POOL_SIZE
    assert settings.upgrade.after == 64
    assert settings.trust.uids == frozenset({0, 7})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIOCOLOC_MODE", "fast"),
        ("AIOCOLOC_MODE", "\uff16\uff14"),  # full-width digits
        ("AIOCOLOC_TRUST", "everyone"),
        ("AIOCOLOC_HANDSHAKE_TIMEOUT", "soon"),
        ("AIOCOLOC_HANDSHAKE_TIMEOUT", "nan"),
        ("AIOCOLOC_HANDSHAKE_TIMEOUT", "inf"),
        ("AIOCOLOC_HANDSHAKE_TIMEOUT", "0"),
        ("AIOCOLOC_HANDSHAKE_TIMEOUT", "\uff12"),  # full-width digits
        ("AIOCOLOC_POOL_SIZE", "64MiB"),
        ("AIOCOLOC_POOL_SIZE", "1024"),
        (
            "AIOCOLOC_POOL_SIZE",
            "\uff16\uff17\uff11\uff10\uff18\uff18\uff16\uff14",
        ),  # full-width digits
        ("AIOCOLOC_HUB_LINGER", "later"),
        ("AIOCOLOC_HUB_LINGER", "-1"),
        ("AIOCOLOC_HUB_LINGER", "inf"),
    ],
)
def test_a_bad_environment_variable_is_named_by_every_connection(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    policy.reset()

    async def scenario() -> None:
        for _ in range(2):  # not only the first
            with pytest.raises(ValueError, match=f"{variable}={value!r}: "):
                await aiocoloc.open_connection("127.0.0.1", 9, upgrade="never")

    run("asyncio", scenario)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCOLOC_MODE", " 4096 ")
    monkeypatch.setenv("AIOCOLOC_TRUST", "uids:0,1")
    monkeypatch.setenv("AIOCOLOC_HANDSHAKE_TIMEOUT", "0.25")
    monkeypatch.setenv("AIOCOLOC_POOL_SIZE", str(policy.MIN_POOL_SIZE))
    monkeypatch.setenv("AIOCOLOC_HUB_LINGER", "2.5")
    policy.reset()
    assert policy.current() == policy.Settings(
        upgrade=policy.Upgrade(4096),
        trust=policy.Trust(uids=frozenset({0, 1})),
        handshake_timeout=0.25,
        pool_size=policy.MIN_POOL_SIZE,
        hub_linger=2.5,
    )


def test_handshake_timeout_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOCOLOC_HANDSHAKE_TIMEOUT", "0.3")
    policy.reset()

    async def scenario() -> None:
        fake = FakeControl(stall)
        port = await fake.start()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            _, writer = await aiocoloc.open_connection("127.0.0.1", port, upgrade="always")
            assert await fell_back(writer) == fallback.TIMED_OUT
            assert loop.time() - started < 1.5  # not the default 2 s
            assert "0.3 s" in info(writer)["fallback_detail"]
            writer.close()
            await writer.wait_closed()
        finally:
            await fake.close()

    run("asyncio", scenario)
