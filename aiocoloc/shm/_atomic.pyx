# cython: language_level=3, boundscheck=False, wraparound=False
"""Atomic operations on words of a shared buffer (pool bookkeeping).

Every access is bounds- and alignment-checked against the buffer: callers
pass offsets computed from untrusted tables, so nothing here may leave it.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, Py_buffer


cdef extern from "includes/atomics.h":
    uint64_t acl_load_acquire_u64(const uint64_t *p) nogil
    void acl_store_release_u64(uint64_t *p, uint64_t v) nogil
    uint32_t acl_load_acquire_u32(const uint32_t *p) nogil
    void acl_store_release_u32(uint32_t *p, uint32_t v) nogil
    int acl_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) nogil
    int acl_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired) nogil
    uint64_t acl_fetch_add_u64(uint64_t *p, uint64_t v) nogil

IMPLEMENTATION = "cython"


cdef class SharedWords:
    """Atomic 32- and 64-bit words of a writable buffer, by byte offset."""

    cdef Py_buffer _buf
    cdef bint _held
    cdef uint8_t *_base

    def __cinit__(self, buffer):
        PyObject_GetBuffer(buffer, &self._buf, PyBUF_WRITABLE)
        self._held = True
        self._base = <uint8_t *>self._buf.buf
        if (<uintptr_t>self._base) % 8:
            self.release()
            raise ValueError("shared words need an 8-byte aligned buffer")

    def __dealloc__(self):
        self.release()

    def release(self) -> None:
        """Drop the hold on the buffer."""
        if self._held:
            self._held = False
            self._base = NULL
            PyBuffer_Release(&self._buf)

    cdef inline uint8_t *_at(self, Py_ssize_t offset, Py_ssize_t width) except NULL:
        if not self._held:
            raise ValueError("shared words released")
        if offset < 0 or offset + width > self._buf.len or offset % width:
            raise IndexError(f"word at {offset} (width {width}) is outside or unaligned "
                             f"in a buffer of {self._buf.len} bytes")
        return self._base + offset

    cdef inline uint8_t *_span(self, Py_ssize_t offset, Py_ssize_t count,
                               Py_ssize_t stride) except NULL:
        if stride < 4 or stride % 4:
            raise ValueError(f"stride {stride} is not a positive multiple of 4")
        self._at(offset, 4)
        self._at(offset + (count - 1) * stride, 4)
        return self._base + offset

    def find32(self, Py_ssize_t offset, Py_ssize_t count, Py_ssize_t stride, uint32_t value,
               Py_ssize_t limit=-1) -> list:
        """Indices ``i < count`` of the 32-bit words at ``offset + i * stride``
        equal to ``value``: the first ``limit`` of them, or all (-1)."""
        cdef list found = []
        cdef Py_ssize_t i, n = 0
        if count <= 0 or limit == 0:
            return found
        cdef uint8_t *base = self._span(offset, count, stride)
        for i in range(count):
            if acl_load_acquire_u32(<uint32_t *>(base + i * stride)) == value:
                found.append(i)
                n += 1
                if n == limit:
                    break
        return found

    def count32(self, Py_ssize_t offset, Py_ssize_t count, Py_ssize_t stride,
                uint32_t value) -> int:
        """How many of the 32-bit words at ``offset + i * stride`` (``i < count``)
        equal ``value``."""
        cdef Py_ssize_t i, n = 0
        if count <= 0:
            return 0
        cdef uint8_t *base = self._span(offset, count, stride)
        for i in range(count):
            if acl_load_acquire_u32(<uint32_t *>(base + i * stride)) == value:
                n += 1
        return n

    def load64(self, Py_ssize_t offset) -> int:
        return acl_load_acquire_u64(<uint64_t *>self._at(offset, 8))

    def store64(self, Py_ssize_t offset, uint64_t value) -> None:
        acl_store_release_u64(<uint64_t *>self._at(offset, 8), value)

    def cas64(self, Py_ssize_t offset, uint64_t expected, uint64_t desired) -> bool:
        return acl_cas_u64(<uint64_t *>self._at(offset, 8), expected, desired) != 0

    def add64(self, Py_ssize_t offset, uint64_t delta) -> int:
        """Atomically add ``delta``; returns the previous value."""
        return acl_fetch_add_u64(<uint64_t *>self._at(offset, 8), delta)

    def load32(self, Py_ssize_t offset) -> int:
        return acl_load_acquire_u32(<uint32_t *>self._at(offset, 4))

    def store32(self, Py_ssize_t offset, uint32_t value) -> None:
        acl_store_release_u32(<uint32_t *>self._at(offset, 4), value)

    def cas32(self, Py_ssize_t offset, uint32_t expected, uint32_t desired) -> bool:
        return acl_cas_u32(<uint32_t *>self._at(offset, 4), expected, desired) != 0
