"""Serf's key commands as the engine uses them: each step judged by whether
this member took it (``install-key``, ``use-key``, ``remove-key`` act on every
member of the cluster; a member that failed or did not answer is logged).

An own agent starts with ``-encrypt`` and the keyring's primary key, and
installs the other keys before it joins anyone.  ``ClusterKeys.rotate_to``
goes through the key commands, which act on every member of the cluster:
the first sidecar to apply a step applies it everywhere, and the others
then find it done.  So it applies only what changed since the keyring it
was given last (a sidecar whose key file did not change never undoes
another's step).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from discovery.engine import EngineError

if TYPE_CHECKING:
    from discovery.keys import Keyring
    from discovery.serf.agent import SerfAgent
    from discovery.serf.rpc import SerfRPC
    from discovery.serf.wire import KeyResponse

__all__ = ["ClusterKeys", "ask", "check_step", "install_keys", "rotate"]

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


async def ask(command: Callable[[], Awaitable[KeyResponse]]) -> KeyResponse:
    """One key command, asked again once if some member did not answer.

    Serf's key commands are queries that travel by gossip, and an answer is
    lost now and then, most of all while another member is failing (seen in
    tests: a live member's answer missing from 2 of 3).  Every command is
    idempotent; a member that is really gone stays missing the second time.
    """
    answer = await command()
    if answer.responses < answer.nodes and not answer.messages:
        _log.debug("key command: %d of %d answered; asking again", answer.responses, answer.nodes)
        answer = await command()
    return answer


async def install_keys(rpc: SerfRPC, keys: tuple[bytes, ...], node: str) -> None:
    """Install ``keys`` (each step checked)."""
    for key in keys:
        check_step(await ask(lambda k=key: rpc.install_key(k)), "install", node)  # type: ignore[misc]


async def rotate(rpc: SerfRPC, before: tuple[bytes, ...], keyring: Keyring, node: str) -> bool:
    """The steps from the keys ``before`` to ``keyring``: install what it
    adds, make its primary the primary, remove what it drops.  True if the
    primary changed."""
    await install_keys(rpc, tuple(k for k in keyring.keys if k not in before), node)
    changed = before[:1] != (keyring.primary,)
    if changed:
        check_step(await ask(lambda: rpc.use_key(keyring.primary)), "make primary", node)
    for key in before:
        if key not in keyring:
            check_step(await ask(lambda k=key: rpc.remove_key(k)), "remove", node)  # type: ignore[misc]
    return changed


class ClusterKeys:
    """The keyring an engine last set on the cluster (an attached agent's:
    as the engine was told), changed through the agent reached with
    ``connection()``; ``agent``: our own agent, if it is ours."""

    def __init__(
        self,
        keyring: Keyring | None,
        agent: SerfAgent | None,
        node: str,
        connection: Callable[[], SerfRPC],
    ) -> None:
        self._keyring = keyring
        self._agent = agent
        self._node = node
        self._connection = connection
        self._lock = asyncio.Lock()  # one rotation at a time

    async def rotate_to(self, keyring: Keyring) -> None:
        """Install the keys ``keyring`` adds, make its primary the primary,
        remove the keys it drops, on every member.  Members that failed a
        step or did not answer are logged (a member that missed a key is
        cut off once the others stop using the keys it has).
        ``EngineError`` if our own agent runs without encryption or this
        member refused a step: the keys last set then stay, and rotating to
        ``keyring`` again retries (every step is idempotent)."""
        if self._agent is not None and self._keyring is None:
            raise EngineError(
                "the serf agent runs without encryption; restart with a key file to encrypt"
            )
        async with self._lock:
            before = self._keyring.keys if self._keyring is not None else ()
            if await rotate(self._connection(), before, keyring, self._node):
                if self._agent is not None:
                    self._agent.encrypt_key = keyring.primary  # a restarted agent's -encrypt
            self._keyring = keyring

    async def install_others(self, rpc: SerfRPC) -> None:
        """A fresh own agent has the primary key only (``-encrypt``): the
        others go in before it joins anyone (so only to itself)."""
        if self._keyring is not None and len(self._keyring) >= 2:
            await install_keys(rpc, self._keyring.keys[1:], self._node)

    async def installed(self) -> dict[bytes, int]:
        """Every key installed on some member, and on how many."""
        rpc = self._connection()
        answer = await ask(rpc.list_keys)
        if answer.error:
            _log.warning("%s: list-keys: %s %s", self._node, answer.error, answer.messages)
        return dict(answer.keys)
