"""Who is co-located with us: answers computed from the member list (pure).

Two members are co-located when both are alive and map a common pool: they
can then move a connection's bytes through it.  An address belongs to the
member that lists its IP among its addresses (an exact ``ip:port`` match
first); a loopback address no member lists is our own.
"""

from __future__ import annotations

import ipaddress

from discovery.api_messages import ApiError, Colocation, MemberView
from discovery.member import Member, split_host

__all__ = ["locate", "member_views", "parse_address"]


def parse_address(text: str) -> tuple[str, int | None]:
    """``(ip, port or None)`` of ``"ip"``, ``"ip:port"``, ``"v6"`` or
    ``"[v6]:port"``, the IP normalised; ``ApiError`` otherwise."""
    text = text.strip()
    host, port = split_host(text)
    if host:
        return host, port
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        raise ApiError(
            "bad-request", f"{text!r:.80} is not an IP address (with an optional port)"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), None


def member_views(local: Member, members: list[Member]) -> list[MemberView]:
    """Every member with what it shares with ``local``, ``local`` first."""
    views = [MemberView(local, True, local.pools)]
    for member in sorted(members, key=lambda m: m.node):
        if member.node != local.node:
            views.append(MemberView(member, False, local.pools & member.pools))
    return views


def locate(address: str, local: Member, members: list[Member]) -> Colocation:
    """Whether ``address`` belongs to a member co-located with ``local``."""
    ip, port = parse_address(address)
    others = [m for m in members if m.node != local.node]
    candidates = [m for m in [local, *others] if ip in m.ips]
    if port is not None:
        exact = [m for m in candidates if any(split_host(a) == (ip, port) for a in m.addresses)]
        candidates = exact or candidates
    # Among several members on one IP (host networking), a live one sharing
    # a pool is the useful answer.
    candidates.sort(key=lambda m: (m.node != local.node, not m.alive, not (m.pools & local.pools)))
    member = candidates[0] if candidates else None
    if member is None and ipaddress.ip_address(ip).is_loopback:
        member = local
    if member is None:
        return Colocation(False, None, frozenset(), None, (), False)
    is_local = member.node == local.node
    shared = local.pools if is_local else local.pools & member.pools
    colocated = is_local or (member.alive and bool(shared))
    return Colocation(
        colocated,
        min(shared) if shared and colocated else None,
        frozenset(shared),
        member,
        member.endpoints,
        is_local,
    )
