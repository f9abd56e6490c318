"""``aiocoloc``: ask the sidecar about members and pools, attach and detach pools.

    aiocoloc members [--api PATH] [--json]
    aiocoloc pools [--api PATH] [--json]
    aiocoloc pools attach|detach NAME [--api PATH] [--json]
    aiocoloc status [--api PATH] [--json]
    aiocoloc colocated ADDRESS [--api PATH] [--json]
    aiocoloc events [--api PATH] [--json]

Exit status: 0 on success, 1 when the sidecar is not running or refuses the
request (one line on stderr says why), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aiocoloc.cli import output, provision
from discovery.client import DEFAULT_TIMEOUT, ApiError, SidecarClient, SidecarUnavailable

__all__ = ["build_parser", "main"]

_log = logging.getLogger("aiocoloc.cli")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: between 0 and 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api", metavar="PATH", default=argparse.SUPPRESS, help="the sidecar's API socket"
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    common.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=argparse.SUPPRESS,
        help=f"how long to wait for the sidecar (default {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug output"
    )
    parser = argparse.ArgumentParser(
        prog="aiocoloc", description="Inspect the aiocoloc sidecar: members, pools, co-location."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("members", parents=[common], help="the members and who is co-located")
    pools = commands.add_parser("pools", parents=[common], help="the pools the sidecar maps")
    change = pools.add_subparsers(dest="change", metavar="attach|detach|create")
    change.add_parser("attach", parents=[common], help="map a pool").add_argument(
        "name", help="a POSIX shm name or an ivshmem device path"
    )
    change.add_parser("detach", parents=[common], help="unmap a pool").add_argument(
        "name", help="the pool's name or id"
    )
    create = change.add_parser(
        "create", help="format a host pool in /dev/shm for VMs to share (no sidecar needed)"
    )
    create.add_argument("name", help="its POSIX shm name (QEMU maps /dev/shm/NAME)")
    create.add_argument("--size", default="64M", help="a power of two, e.g. 64M (default)")
    create.add_argument("--slice-size", default="64K", help="pipes grow by this (default 64K)")
    create.add_argument("--group", help="make it 0660 and owned by this group")
    create.add_argument(
        "--lease",
        type=float,
        default=provision.HOST_POOL_LEASE,
        help="seconds a member's heartbeat may stall before it is reaped "
        f"(default {provision.HOST_POOL_LEASE:g})",
    )
    commands.add_parser("status", parents=[common], help="the sidecar's status")
    colocated = commands.add_parser(
        "colocated", parents=[common], help="is this address co-located with us?"
    )
    colocated.add_argument("address", help="ip or ip:port")
    commands.add_parser("events", parents=[common], help="follow membership events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "pools" and getattr(args, "change", None) == "create":
        try:
            output.print_line(
                provision.create_for_cli(
                    args.name, args.size, args.slice_size, args.group, args.lease
                )
            )
        except provision.ProvisionError as exc:
            output.print_error(str(exc))
            return 2
        return 0
    client = SidecarClient(
        getattr(args, "api", None), timeout=getattr(args, "timeout", DEFAULT_TIMEOUT)
    )
    try:
        return asyncio.run(_command(client, args))
    except SidecarUnavailable as exc:
        output.print_error(f"the sidecar is not running: {exc}")
        return 1
    except ApiError as exc:
        output.print_error(f"{exc.message} ({exc.code})")
        return 1
    except KeyboardInterrupt:
        return 130


async def _command(client: SidecarClient, args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    _log.debug("%s on %s", args.command, client.path)
    async with client:
        if args.command == "members":
            output.print_members(await client.members(), as_json)
        elif args.command == "pools" and getattr(args, "change", None) == "attach":
            output.print_pool_change("attached", await client.attach_pool(args.name), as_json)
        elif args.command == "pools" and getattr(args, "change", None) == "detach":
            output.print_pool_change("detached", await client.detach_pool(args.name), as_json)
        elif args.command == "pools":
            output.print_pools(await client.pools(), as_json)
        elif args.command == "status":
            output.print_status(await client.status(), as_json)
        elif args.command == "colocated":
            output.print_colocation(args.address, await client.colocated(args.address), as_json)
        elif args.command == "events":
            await _follow(client, as_json)
    return 0


async def _follow(client: SidecarClient, as_json: bool) -> None:
    feed = await client.subscribe()
    async with feed:
        with contextlib.suppress(asyncio.CancelledError):
            async for event in feed:
                output.print_event(event, as_json)
