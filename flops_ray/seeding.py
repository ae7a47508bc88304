"""Counter-based seeds: every random draw is a pure function of the root seed and a counter tuple.

A query's noise depends only on ``(root_seed, step, sample_id, draw_index, group)`` and the coordinate
(:mod:`flops_ray.estimators.noise` makes it on the replica's device), so any replica regenerates it bit for bit and
nothing noise-sized ever crosses the wire.

>>> derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
True
>>> derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
True
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1

# Streams keep draws of different purposes independent even for equal counters.
STREAM_QUERY = 1
STREAM_TRACE = 2
STREAM_ALLOC = 3
STREAM_DATA = 4
STREAM_INIT = 5
STREAM_ALLOC_FIT = 6
STREAM_TUNE = 7


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def splitmix64_state(*counters: int) -> int:
    """The 64-bit state of the splitmix64 chain over ``counters`` (order matters)."""
    h = 0
    for c in counters:
        h = _splitmix64(h ^ (int(c) & _MASK))
    return h


def derive_seed(*counters: int) -> int:
    """Mix integer counters into one 63-bit seed (:func:`splitmix64_state`, its top 63 bits)."""
    return splitmix64_state(*counters) >> 1


def generator(*counters: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` (CPU so every device draws the same numbers)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*counters))
    return g
