"""Waking the other end: eventfd doorbells (``doorbell``), one doorbell pair
shared by the connections between two event loops (``hub``), doorbells as
control messages between kernels, and the bounded spin of a reader before
it sleeps (``spin``)."""
