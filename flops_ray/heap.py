"""Keep freed memory mapped: a replica allocates and frees the same large buffers chunk after chunk.

glibc hands the top of its heap back to the operating system once more than its trim threshold is free,
and serves blocks above its mmap threshold with fresh mappings, unmapped again when freed; the next chunk
then touches every page again (a fault and a zeroed 4 KiB page each). A shard's noise, per-row parameters
and activations are megabytes per chunk, so on the digits ViT that cost a quarter of an SPSA shard's time.
Raising both thresholds keeps freed pages for the next chunk; the process holds on to what it has used (its
peak stays its footprint). Both must be set: setting either one stops glibc from raising the mmap threshold
by itself, which left a replica at the default 128 KiB and 14x the page faults of an in-process engine whose
threshold had already grown (about 10% of an ES step). Nothing changes off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30
"""Free bytes at the top of the heap glibc keeps before returning them (its default is 128 KiB, adapting)."""
MMAP_THRESHOLD = 32 << 20
"""Blocks at least this large get a mapping of their own (glibc's ceiling for it on 64-bit systems; its default
is 128 KiB, adapting): a shard's blocks stay on the heap."""


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once); whether both took effect."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
