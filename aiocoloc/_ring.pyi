# The compiled core has exactly the API of the pure-Python reference.
from aiocoloc._ring_py import HEADER_SIZE as HEADER_SIZE
from aiocoloc._ring_py import IMPLEMENTATION as IMPLEMENTATION
from aiocoloc._ring_py import LAYOUT as LAYOUT
from aiocoloc._ring_py import LAYOUT_VERSION as LAYOUT_VERSION
from aiocoloc._ring_py import MAGIC as MAGIC
from aiocoloc._ring_py import MIN_CAPACITY as MIN_CAPACITY
from aiocoloc._ring_py import PipeConsumer as PipeConsumer
from aiocoloc._ring_py import PipeProducer as PipeProducer
from aiocoloc._ring_py import RingConsumer as RingConsumer
from aiocoloc._ring_py import RingProducer as RingProducer
from aiocoloc._ring_py import format_pipe as format_pipe
from aiocoloc._ring_py import format_ring as format_ring
from aiocoloc._ring_py import pipe_entry_size as pipe_entry_size
from aiocoloc._ring_py import ring_size as ring_size
