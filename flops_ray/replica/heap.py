"""Keep freed memory mapped: a replica allocates and frees the same large buffers chunk after chunk.

glibc hands the top of its heap back to the operating system once more than its trim threshold is free, and
serves blocks above its mmap threshold with fresh mappings, unmapped again when freed; the next chunk then
touches every page again (a fault and a zeroed page each). A shard's noise, per-row parameters and activations
are megabytes per chunk, so raising both thresholds keeps freed pages for the next chunk. Both must be set:
setting either one alone stops glibc from raising the mmap threshold by itself, leaving it at its small
default. The mmap threshold stays moderate, since what the heap keeps counts in the peak: the largest blocks
(a big model's activations) still get mappings of their own. Nothing changes off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30
"""Free bytes at the top of the heap glibc keeps before returning them (its default is 128 KiB, adapting).
Kept large on purpose: with smaller values a native thread has crashed at interpreter exit reading just above
the heap's top (the reader is not found; keeping the pages may hide it rather than mend it)."""
MMAP_THRESHOLD = 8 << 20
"""Blocks at least this large get a mapping of their own (its default is 128 KiB, adapting): a small model's
noise and per-row parameters stay on the heap."""


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once); whether both took effect."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # The mmap threshold first: a trim threshold set alone would freeze the mmap threshold where it stands.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
