"""Building the membership engine the configuration names.

Engines are imported here, when one is built, so the daemon's other modules
(and its flag parsing) load without them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from discovery.daemon.config import Config, HostPort
from discovery.engine import Engine, EngineError
from discovery.keys import Keyring

__all__ = ["KeyFileError", "advertise_address", "load_keyring", "make_engine"]

_log = logging.getLogger("discovery.daemon.engines")


class KeyFileError(RuntimeError):
    """The key file cannot be read or holds no usable key."""


def load_keyring(path: Path) -> Keyring:
    """The keyring in ``path``; ``KeyFileError`` saying why not."""
    try:
        return Keyring.load(path)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path}: is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # messages name the file and line already
        raise KeyFileError(f"key file {exc}") from None


def _serf_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"serf RPC auth file {path}: {exc}") from None


def advertise_address(config: Config) -> str | None:
    """The address to advertise: ``--advertise``, else none when the bind
    address is specific, else (bound to a wildcard) the address this host
    routes from, as the kernel picks it for a datagram to a documentation
    address (nothing is sent)."""
    if config.advertise is not None:
        return str(config.advertise)
    if config.bind.host not in ("0.0.0.0", "::"):
        return None
    if config.bind.port == 0:
        raise EngineError(f"binding {config.bind} with port 0 needs --advertise")
    family, probe = (
        (socket.AF_INET6, "2001:db8::1")
        if config.bind.host == "::"
        else (socket.AF_INET, "192.0.2.1")
    )
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            ip = sock.getsockname()[0]
    except OSError as exc:
        raise EngineError(
            f"binding {config.bind} needs --advertise (no route to guess an address from: {exc})"
        ) from None
    address = str(HostPort(ip, config.bind.port))
    _log.info("bound to %s: advertising %s (set --advertise to choose)", config.bind, address)
    return address


def make_engine(
    config: Config,
    keyring: Keyring | None,
    pools: frozenset[str],
    endpoints: Sequence[str],
    slots: Mapping[str, bytes],
) -> Engine:
    """The engine of ``config`` (not started), advertising ``pools``,
    ``endpoints`` and ``slots``."""
    advertise = advertise_address(config)
    if config.engine == "embedded":
        from discovery.swim import SwimEngine

        return SwimEngine(
            config.node,
            str(config.bind),
            profile=config.profile,
            keyring=keyring,
            pools=pools,
            endpoints=tuple(endpoints),
            slots=slots,
            advertise=advertise,
        )
    if config.engine == "serf":
        from discovery.serf import SerfEngine

        return SerfEngine(
            config.node,
            str(config.bind),
            profile=config.profile,
            keyring=keyring,
            pools=pools,
            endpoints=tuple(endpoints),
            slots=slots,
            advertise=advertise,
            rpc=None if config.serf_rpc is None else str(config.serf_rpc),
            rpc_auth=_serf_token(config.serf_rpc_auth_file),
            serf_binary=config.serf_binary,
        )
    raise EngineError(f"unknown engine {config.engine!r}")
