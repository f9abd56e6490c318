"""The membership service of aiocoloc: which nodes exist, which shared
memory pools each maps, and what changes, as a stream of events.

Run as the ``aiocoloc-discoveryd`` sidecar; the library talks to it through
its local API (``discovery.client``).  Engines: ``discovery.swim`` (embedded
SWIM with Lifeguard, the default) and ``discovery.serf`` (HashiCorp Serf).
"""

from discovery.engine import Engine, EngineError
from discovery.events import Event, EventStream, Subscription
from discovery.member import Member, MemberError, Status

__all__ = [
    "Engine",
    "EngineError",
    "Event",
    "EventStream",
    "Member",
    "MemberError",
    "Status",
    "Subscription",
]
