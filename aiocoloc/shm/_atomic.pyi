# The compiled module has exactly the API of the pure-Python stand-in.
from aiocoloc.shm._atomic_py import IMPLEMENTATION as IMPLEMENTATION
from aiocoloc.shm._atomic_py import SharedWords as SharedWords
