"""Keep freed memory mapped: a replica allocates and frees the same large buffers chunk after chunk.

glibc hands the top of its heap back to the operating system once more than its trim threshold is free,
and serves large blocks with fresh mappings; the next chunk then touches every page again (a fault and a
zeroed 4 KiB page each). A shard's noise, per-row parameters and activations are megabytes per chunk, so
on the digits ViT that cost a quarter of an SPSA shard's time. Raising the threshold keeps freed pages for
the next chunk; the process holds on to what it has used (its peak stays its footprint). Nothing changes
off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
TRIM_THRESHOLD = 1 << 30
"""Free bytes at the top of the heap glibc keeps before returning them (its default is 128 KiB, adapting)."""


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's trim threshold for this process (once); whether it took effect."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
