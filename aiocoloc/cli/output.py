"""What the CLI prints: rich tables for people, JSON for scripts.

The only place the CLI writes to stdout/stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from discovery.api_messages import Colocation, MemberView, PoolInfo
from discovery.events import Event

__all__ = [
    "print_colocation",
    "print_error",
    "print_event",
    "print_json",
    "print_members",
    "print_pool_change",
    "print_pools",
    "print_status",
]

_STATUS_STYLE = {"alive": "green", "suspect": "yellow", "failed": "red", "left": "dim"}


def _console() -> Console:
    # Without a terminal, rich would wrap tables at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160)


def _short(pool_id: str) -> str:
    return pool_id[:8]


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    print(json.dumps(data, indent=2, sort_keys=False))


def print_line(message: str) -> None:
    """One line on stdout."""
    print(message)


def print_error(message: str) -> None:
    """One line on stderr."""
    print(f"aiocoloc: {message}", file=sys.stderr)


def print_members(views: Sequence[MemberView], as_json: bool) -> None:
    """The member list."""
    if as_json:
        print_json([v.to_json() for v in views])
        return
    table = Table(title="members", title_justify="left")
    for column in ("node", "addresses", "pools", "status", "co-located", "endpoints"):
        table.add_column(column)
    for view in views:
        member = view.member
        status = member.status.value
        if view.local:
            where = "this node"
        elif view.colocated:
            where = "yes, via " + ", ".join(_short(p) for p in sorted(view.shared_pools))
        else:
            where = "no"
        table.add_row(
            member.node + (" *" if view.local else ""),
            "\n".join(member.addresses),
            "\n".join(_short(p) for p in sorted(member.pools)) or "-",
            f"[{_STATUS_STYLE.get(status, '')}]{status}[/]",
            where,
            "\n".join(member.endpoints) or "-",
        )
    _console().print(table)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def print_pools(pools: Sequence[PoolInfo], as_json: bool) -> None:
    """The pools the sidecar maps."""
    if as_json:
        print_json([p.to_json() for p in pools])
        return
    if not pools:
        _console().print("no pools mapped")
        return
    table = Table(title="pools", title_justify="left")
    for column in ("name", "id", "kind", "size", "members", "source"):
        table.add_column(column)
    for pool in pools:
        table.add_row(
            pool.name, pool.id, pool.kind, _size(pool.size), str(pool.members), pool.source
        )
    _console().print(table)


def print_pool_change(verb: str, pool: PoolInfo, as_json: bool) -> None:
    """The pool just attached or detached."""
    if as_json:
        print_json(pool.to_json())
    else:
        print(f"{verb} pool {pool.name} ({pool.id})")


def print_status(status: dict[str, Any], as_json: bool) -> None:
    """The sidecar's status."""
    if as_json:
        print_json(status)
        return
    table = Table(show_header=False, title="aiocoloc-discoveryd", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in status.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "\n".join(map(str, value)) or "-"
        table.add_row(key, str(value))
    _console().print(table)


def print_colocation(address: str, answer: Colocation, as_json: bool) -> None:
    """Whether ``address`` is co-located with us."""
    if as_json:
        print_json(answer.to_json())
        return
    if answer.member is None:
        print(f"{address}: no member has this address: not co-located")
    elif answer.local:
        print(f"{address}: this node ({answer.member.node})")
    elif answer.colocated:
        print(f"{address}: co-located: {answer.member.node} via pool {answer.pool}")
    else:
        print(f"{address}: {answer.member.node} ({answer.member.status.value}), not co-located")


def print_event(event: Event, as_json: bool) -> None:
    """One event of the stream, as it comes."""
    if as_json:
        print(json.dumps(event.to_json()), flush=True)
        return
    member = event.member
    pools = ",".join(_short(p) for p in sorted(member.pools)) or "-"
    print(f"{event.kind:7} {member.node} {member.status.value} pools={pools}", flush=True)
