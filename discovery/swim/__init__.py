"""The embedded SWIM engine (with Lifeguard): aiocoloc's default membership
engine, a gossip cluster over UDP and TCP authenticated with a shared key.

Modules, one concept each: ``messages`` (the wire: kinds, codec, checks),
``packet`` (framing, AES-GCM or checksum), ``transport`` (sockets, drops,
fault injection), ``state`` (member table and its state machine),
``suspicion`` and ``awareness`` (Lifeguard), ``broadcast`` (piggy-backed
dissemination), ``probe`` (failure detection), ``engine`` (``SwimEngine``).
"""

from discovery.swim.engine import SwimEngine

__all__ = ["SwimEngine"]
