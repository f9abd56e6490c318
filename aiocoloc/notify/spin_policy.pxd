# Augments spin_policy.py (Cython's pure-Python mode): SpinPolicy becomes a
# cdef class with typed fields, its config's bounds copied into C integers.

cdef class SpinPolicy:
    cdef public object config
    cdef public bint enabled
    cdef readonly long long max_ns, rearm_ns
    cdef readonly int misses_to_stop, max_backoff
    cdef list misses, backoff, slow_wakes, on_probation, last_wake_ns
    cdef int probe_backoff, rings
    cdef public long long spins, hits

    cpdef bint wants(self, int trigger)
    cpdef bint alone(self, loop)
    cpdef bint claim(self, loop)
    cpdef release(self, loop)
    cpdef record(self, int trigger, bint found)
    cpdef bint may_spin_after_ring(self, int trigger)
    cpdef probed(self, int trigger, caught_after_ns)
    cpdef woken_after(self, int trigger, long long slept_ns)
