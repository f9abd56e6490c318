"""Serf's key commands as the engine uses them: each step judged by whether
this member took it (``install-key``, ``use-key``, ``remove-key`` act on every
member of the cluster; a member that failed or did not answer is logged)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from discovery.engine import EngineError

if TYPE_CHECKING:
    from discovery.keys import Keyring
    from discovery.serf.rpc import SerfRPC
    from discovery.serf.wire import KeyResponse

__all__ = ["check_step", "install_keys", "rotate"]

_log = logging.getLogger("discovery.serf.engine")


def check_step(answer: KeyResponse, what: str, node: str) -> None:
    """Judge one key command's answer: an error if member ``node`` failed it."""
    if node in answer.messages or (answer.error and not answer.responses):
        raise EngineError(
            f"serf agent could not {what} a key: {answer.messages.get(node) or answer.error}"
        )
    if answer.error:
        _log.warning(
            "%s: %s key: %s (%d of %d members answered) %s",
            node,
            what,
            answer.error,
            answer.responses,
            answer.nodes,
            "; ".join(f"{n}: {m}" for n, m in sorted(answer.messages.items())),
        )


async def install_keys(rpc: SerfRPC, keys: tuple[bytes, ...], node: str) -> None:
    """Install ``keys`` (each step checked)."""
    for key in keys:
        check_step(await rpc.install_key(key), "install", node)


async def rotate(rpc: SerfRPC, before: tuple[bytes, ...], keyring: Keyring, node: str) -> bool:
    """The steps from the keys ``before`` to ``keyring``: install what it
    adds, make its primary the primary, remove what it drops.  True if the
    primary changed."""
    await install_keys(rpc, tuple(k for k in keyring.keys if k not in before), node)
    changed = before[:1] != (keyring.primary,)
    if changed:
        check_step(await rpc.use_key(keyring.primary), "make primary", node)
    for key in before:
        if key not in keyring:
            check_step(await rpc.remove_key(key), "remove", node)
    return changed
