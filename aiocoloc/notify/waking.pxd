# Augments waking.py (Cython's pure-Python mode): HubBell becomes a cdef class
# with typed fields, and wake_listeners a C function it calls directly.

cpdef wake_listeners(listeners, loop, owner)


cdef class HubBell:
    cdef public object loop, owner, words
    cdef readonly int listen_fd, ring_fd, ring_word, listen_word
    cdef readonly dict listeners
    cdef public long long rings, wakeups

    cpdef ring(self)
    cpdef on_readable(self)
    cpdef close(self)
