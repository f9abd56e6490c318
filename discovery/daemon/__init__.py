"""``aiocoloc-discoveryd``: the membership sidecar, one per host, VM or
container group.

It runs a membership engine (embedded SWIM, or a Serf agent), maps the
shared-memory pools of its host and advertises their ids in its member
record, watches co-located peers through those pools, and answers the
library and the ``aiocoloc`` CLI on a local Unix socket
(``discovery.api_messages``).  Modules:

- ``config``: flags and the TOML config file;
- ``pools``: naming, opening, probing the pools; ``slots``: which pool slot
  is which sidecar; ``watch``: co-located peers seen through the pools;
- ``view``: the membership served (the engine's, with the watch's verdicts);
- ``colocation``: who is co-located with us;
- ``advertised``: servers' control endpoints, withdrawn when they exit;
- ``api``: the local API socket; ``engines``: building the engine;
- ``service``: the sidecar's life cycle; ``main``: the entry point.
"""
