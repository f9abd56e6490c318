"""HashiCorp Serf as a membership engine: ``SerfEngine`` drives a Serf agent
(its own, or one already running) over Serf's RPC protocol (``SerfRPC``),
with our member record in the agent's tags.

Modules: ``wire`` (messages and errors of the RPC protocol), ``streams``
(what waits for the agent's answers), ``connection`` (one RPC connection:
answers matched to requests and streams), ``rpc`` (the asyncio client:
Serf's commands), ``agent`` (a ``serf agent`` process), ``tags`` (our
record in Serf's 512 bytes of tags), ``local_record`` (our record kept in
the agent's tags), ``view`` (Serf's members as our records, changes as
events), ``records`` (whole records by query when the tags cannot carry
them), ``sync`` (the event stream followed, resyncs after gaps),
``key_commands`` (key rotation through Serf's key commands), ``engine``
(``SerfEngine``).
"""

from discovery.serf.agent import PROFILES, SerfAgent, SerfAgentStartError
from discovery.serf.engine import SerfEngine
from discovery.serf.records import RECORD_QUERY
from discovery.serf.rpc import SerfRPC
from discovery.serf.streams import RecordStream
from discovery.serf.tags import TAG, TagsTooLarge
from discovery.serf.wire import (
    MemberEvent,
    QueryEvent,
    QueryRecord,
    SerfAgentError,
    SerfAuthError,
    SerfConnectionError,
    SerfError,
    SerfMember,
    SerfProtocolError,
    SerfTimeoutError,
    StreamGap,
    UserEvent,
)

__all__ = [
    "PROFILES",
    "RECORD_QUERY",
    "TAG",
    "MemberEvent",
    "QueryEvent",
    "QueryRecord",
    "RecordStream",
    "SerfAgent",
    "SerfAgentError",
    "SerfAgentStartError",
    "SerfAuthError",
    "SerfConnectionError",
    "SerfEngine",
    "SerfError",
    "SerfMember",
    "SerfProtocolError",
    "SerfRPC",
    "SerfTimeoutError",
    "StreamGap",
    "TagsTooLarge",
    "UserEvent",
]
