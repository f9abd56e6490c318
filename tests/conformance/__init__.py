"""The transport conformance suite (uvloop's pattern).

Each ``test_*`` module holds mixins of behaviour tests; each mixin is mixed
into one class per implementation from ``impls``: the loop's own TCP
transport (asyncio's, uvloop's) and aiocoloc's ``SwitchableTransport`` on
that loop, on TCP, on shared memory, and switched from TCP to shared memory
mid-test.  The reference's behaviour is the expected one for its loop; a
difference that cannot be removed is asserted as such (``Impl.differs``)
and listed in README.md, "Differences from asyncio/uvloop".
"""
