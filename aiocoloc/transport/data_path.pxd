# Augments data_path.py (Cython's pure-Python mode): DataPath becomes a cdef
# class whose fields are typed slots in its C struct, and the methods it calls
# on itself are cpdef (a C call inside the class, a method from Python).
# Every field is public: the transport's mixins read and write them through
# the properties of state.TransportState.

cimport cython


cdef class DataPath:
    cdef public object owner, loop, protocol, context
    cdef public bytearray overflow, tcp_backlog
    cdef public object rx_held
    cdef public object tcp, shm, producer, consumer, doorbell, resizing, spin, spin_handle
    cdef public str tx, rx
    cdef public long long rx_switch_at, traffic_goal, tx_pos, rx_pos, conn_lost, slept_at
    cdef public int slept_for
    cdef public bint buffered, direct, entered, eof_pending, eof_written, waiting_space
    cdef public bint woke_peer, rx_eof, rx_asleep, drain_scheduled, paused_reading
    cdef public bint closing, lost_called, lends, big_reads

    cpdef set_shm(self, shm)

    @cython.locals(size=Py_ssize_t, written=Py_ssize_t)
    cpdef write(self, data)

    cpdef other_data(self, data)
    cpdef check_alive(self)
    cpdef write_after_loss(self, data)
    cpdef str owner_repr(self)
    cpdef bint is_closing(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef deliver(self, data)
    cpdef call_data_received(self, data)
    cpdef set_protocol(self, protocol, bint buffered)
    cpdef tcp_received(self, data)
    cpdef tcp_data(self, data)
    cpdef on_doorbell(self)
    cpdef bint may_be_rung(self)
    cpdef woken(self)
    cpdef schedule_drain(self)
    cpdef drain_soon(self)

    @cython.locals(moved=Py_ssize_t, limit=cython.longlong, chunk=cython.longlong, n=object)
    cpdef drain(self)

    @cython.locals(probe_from=cython.longlong)
    cpdef wait_for_bytes(self, int trigger)

    cpdef sleep(self)
    cpdef spin_wait(self, int trigger, long long probe_from)
