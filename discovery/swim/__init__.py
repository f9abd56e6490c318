"""The embedded SWIM engine (with Lifeguard): aiocoloc's default membership
engine, a gossip cluster over UDP and TCP authenticated with a shared key.

Modules, one concept each: ``messages`` (the wire: kinds, codec, checks),
``packet`` (framing, AES-GCM or checksum), ``transport`` (sockets, drops,
fault injection), ``table`` (the member table), ``state`` (its state
machine), ``suspicion`` and ``awareness`` (Lifeguard), ``broadcast`` (the
queue of piggy-backed dissemination), ``gossip`` (sending it: piggy-backed
and in rounds), ``probe`` (failure detection), ``sync`` (push/pull state
exchange), ``engine`` (``SwimEngine``, wiring them together).
"""

from discovery.swim.engine import SwimEngine

__all__ = ["SwimEngine"]
