"""Counter-based Gaussian noise made on the replica's device: a pure function of a draw's key and coordinate.

Each noise draw has a 64-bit key, ``derive_seed(root_seed, STREAM_QUERY, step, sample_id, draw, group)``
(:mod:`flops_ray.seeding`), computed here for a whole shard in one vectorised splitmix64 chain. Coordinate
``c`` of the draw is a SplitMix-style stream: the 32-bit counter ``c * gamma + k0`` (``k0`` the key's low
half, ``gamma`` its high half made odd, so each key walks its own permutation of the counters) goes through
the ``lowbias32`` integer mixer; its top 23 bits ``u`` give a symmetric grid point ``v = (2u + 1) / 2^23 - 1``
of ``(-1, 1)`` and the Gaussian ``z = sqrt(2) erfinv(v)``. Symmetric by construction (the estimate's noise has
mean exactly zero), cut at about 5.3 sigma (a variance deficit below 1e-6).

Everything is elementwise torch integer and float arithmetic, so one call produces a shard's noise on a GPU
with no host round trip, and a CPU and a GPU agree to within ``erfinv``'s rounding. No
``torch.Generator`` is involved: any replica regenerates any draw, or any slice of one, bit for bit.

>>> keys = draw_keys(0, 1, 2, torch.tensor([5, 5, 7]), torch.tensor([0, 1, 0]))
>>> z = gaussian(keys, 10)
>>> z.shape, bool(torch.equal(gaussian(keys[1:2], 10), z[1:2]))
(torch.Size([3, 10]), True)
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable

import torch

from flops_ray.seeding import STREAM_QUERY, splitmix64_state

_M64 = (1 << 64) - 1


def _signed(value: int, bits: int) -> int:
    """An unsigned constant as the two's complement integer torch stores."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


_GOLDEN = _signed(0x9E3779B97F4A7C15, 64)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9, 64), _signed(0x94D049BB133111EB, 64)
_LOW1, _LOW2 = _signed(0x21F0AAAD, 32), _signed(0xD35A2D97, 32)
_MAX_SIZE = 1 << 31
_CPU_BLOCK = 1 << 17
"""Numbers per elementwise pass on a CPU: a block's two int32 buffers (1 MiB) stay in a core's L2 plus its
share of L3, while smaller blocks would pay per-pass dispatch (docs/RESULTS.md). A GPU does a draw in one pass."""


def _shr(x: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
    """Logical right shift of a two's complement ``bits``-wide integer tensor."""
    return (x >> shift) & ((1 << (bits - shift)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (multiplication wraps modulo 2^64, as the unsigned original)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30, 64)) * _MIX1
    x = (x ^ _shr(x, 27, 64)) * _MIX2
    return x ^ _shr(x, 31, 64)


def derive_seeds(state: int, *counters: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`flops_ray.seeding.derive_seed`, continuing a chain whose state so far is ``state``.

    Args:
        state: :func:`flops_ray.seeding.splitmix64_state` of the leading scalar counters.
        counters: int64 tensors of one shape, the remaining counters in order.

    Returns:
        int64 seeds (63 bits, non-negative), one per element.
    """
    h = torch.full_like(counters[0], _signed(state, 64))
    for c in counters:
        h = _splitmix64(h ^ c)
    return _shr(h, 1, 64)


def draw_keys(root_seed: int, step: int, group: int, sample_ids: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``(D,)`` int64 keys of noise draws ``(sample_ids[d], draws[d])``: one vectorised call for a shard."""
    state = splitmix64_state(root_seed, STREAM_QUERY, step)
    group_t = torch.full_like(sample_ids, group)
    return derive_seeds(state, sample_ids.long(), draws.long(), group_t.long())


def _normal(k0: torch.Tensor, gamma: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``(D, n)`` float32 normals at int32 ``counters (n,)`` of the streams ``(k0, gamma)`` (each ``(D, 1)`` int32).

    Elementwise only, so a GPU runs it as one fused kernel once compiled; in place on its own buffers, so a
    CPU makes no more passes over memory than it must.
    """
    x = counters * gamma
    x.add_(k0)  # wraps modulo 2^32
    t = torch.empty_like(x)
    # lowbias32: a bijection of 32-bit integers with low avalanche bias
    for shift, mult in ((16, _LOW1), (15, _LOW2), (15, None)):
        torch.bitwise_right_shift(x, shift, out=t)
        x.bitwise_xor_(t.bitwise_and_((1 << (32 - shift)) - 1))
        if mult is not None:
            x.mul_(mult)
    z = _shr(x, 9, 32).float()
    return z.mul_(2.0**-22).add_(2.0**-23 - 1.0).erfinv_().mul_(math.sqrt(2.0))


@functools.cache
def _fused() -> Callable[..., torch.Tensor]:
    """:func:`_normal` compiled for GPUs (one kernel instead of a dozen passes over memory), where Triton is."""
    if importlib.util.find_spec("triton") is None:
        return _normal
    return torch.compile(_normal, dynamic=True)


def gaussian(keys: torch.Tensor, size: int, dtype: torch.dtype = torch.float32, start: int = 0) -> torch.Tensor:
    """Standard normal noise of draws ``keys`` at coordinates ``start .. start+size-1``, on ``keys``' device.

    Args:
        keys: ``(D,)`` int64 draw keys (:func:`draw_keys`).
        size: numbers per draw (``start + size`` below 2^31).
        dtype: floating dtype of the result; the numbers are computed in float32.
        start: the first coordinate: any range of a draw is made directly, the same bits as the whole draw's.

    Returns:
        ``(D, size)`` noise; row ``d`` depends only on ``keys[d]``.
    """
    if size < 0 or start < 0 or start + size >= _MAX_SIZE:
        raise ValueError(f"noise coordinates [{start}, {start + size}) are outside [0, 2^31)")
    k0 = (keys & 0xFFFFFFFF).to(torch.int32)[:, None]  # wraps to the signed 32-bit pattern
    gamma = (_shr(keys, 32, 64) | 1).to(torch.int32)[:, None]
    counters = torch.arange(start, start + size, dtype=torch.int32, device=keys.device)
    if keys.device.type == "cuda":
        out = _fused()(k0, gamma, counters)
    else:
        out = torch.empty(len(keys), size, dtype=torch.float32, device=keys.device)
        block = max(1, _CPU_BLOCK // max(1, len(keys)))
        for start in range(0, size, block):
            out[:, start : start + block] = _normal(k0, gamma, counters[start : start + block])
    return out if dtype == torch.float32 else out.to(dtype)
