"""``aiocoloc``: the operator's command line.

Inspects the membership sidecar (``aiocoloc-discoveryd``) through its local
API -- members, pools, status, co-location of an address, the event stream
-- and attaches or detaches pools for migrations.  ``main`` parses and
runs a command; ``output`` prints (rich tables, or JSON for scripts).
"""
