"""``install()``: every event loop's ``create_connection``/``create_server``
routed through aiocoloc, so unmodified libraries ride on it.

The loop classes are patched (``asyncio.BaseEventLoop``, ``uvloop.Loop``),
not instances, so loops that libraries create route through aiocoloc too;
``original()`` gives the loop's own method, which aiocoloc itself calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiocoloc.connect import api

__all__ = ["install", "installed", "original", "uninstall"]

_log = logging.getLogger("aiocoloc.connect")
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

#: (loop class, method name) -> (the method it had, whether it defined it itself)
_saved: dict[tuple[type, str], tuple[Any, bool]] = {}


def original(loop: asyncio.AbstractEventLoop, name: str) -> Callable[..., Awaitable[Any]]:
    """``loop.<name>`` as the loop itself defines it, even when installed."""
    if _saved:
        for klass in type(loop).__mro__:
            saved = _saved.get((klass, name))
            if saved is not None:
                return saved[0].__get__(loop)  # type: ignore[no-any-return]
    return getattr(loop, name)  # type: ignore[no-any-return]


async def _routed_create_connection(
    self: asyncio.AbstractEventLoop, protocol_factory: ProtocolFactory, *args: Any, **kwargs: Any
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    return await api.create_connection(self, protocol_factory, *args, **kwargs)


async def _routed_create_server(
    self: asyncio.AbstractEventLoop, protocol_factory: ProtocolFactory, *args: Any, **kwargs: Any
) -> api.Server:
    return await api.create_server(self, protocol_factory, *args, **kwargs)


_ROUTED = {"create_connection": _routed_create_connection, "create_server": _routed_create_server}


def _loop_classes() -> list[type]:
    classes: list[type] = [asyncio.BaseEventLoop]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        pass
    else:
        classes.append(uvloop.Loop)
    return classes


def install() -> None:
    """Route ``create_connection``/``create_server`` of every event loop
    (asyncio's and uvloop's) through aiocoloc, so unmodified libraries get
    shared memory when co-located.  Idempotent; ``uninstall()`` undoes it."""
    for klass in _loop_classes():
        for name, routed in _ROUTED.items():
            if (klass, name) not in _saved:
                _saved[(klass, name)] = (getattr(klass, name), name in klass.__dict__)
                setattr(klass, name, routed)
    _log.debug("installed on %s", [k.__name__ for k in _loop_classes()])


def uninstall() -> None:
    """Give the loops their own methods back."""
    for (klass, name), (function, own) in list(_saved.items()):
        if own:
            setattr(klass, name, function)
        else:
            delattr(klass, name)
        del _saved[(klass, name)]


def installed() -> bool:
    return bool(_saved)
