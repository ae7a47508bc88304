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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


SLICE = 1 << 18
"""Coordinates of a canonical slice of a draw (:attr:`NoiseLayout.slices`): every weighted sum of draws is computed
slice by slice, so replicas that each rebuild some slices of a step's gradient get the bits of the whole."""


@dataclass(frozen=True)
class Slice:
    """Rows ``lo .. hi-1`` of a rank-1 block, or coordinates ``lo .. hi-1`` of a dense one."""

    block: int
    lo: int
    hi: int
    offset: int
    """Where the slice's first coordinate sits in the flat draw."""
    size: int
    """Coordinates it covers."""


def _weigh(u: torch.Tensor, v: torch.Tensor | None, coefs: torch.Tensor) -> torch.Tensor:
    """``sum_d coefs[d] z_d`` over one slice, flat: ``z_d = u_d`` (dense) or ``u_d v_d^T`` (rank-1 rows). The
    operands are made contiguous first, so a slice cut from whole streams and one made alone run the same kernels."""
    if v is None:
        return coefs @ u.contiguous()
    return ((u * coefs[:, None]).T @ v.contiguous()).flatten()


@dataclass(frozen=True)
class NoiseLayout:
    """How a draw's numbers fill a flat ``(size,)`` vector: block by block, dense or rank-1.

    A dense block of ``n`` coordinates takes ``n`` independent normals. A rank-1 block ``(m, n)`` (a weight
    matrix) is ``vec(u v^T)`` with ``u (m,)`` and ``v (n,)`` independent normals: ``E[z z^T] = I`` as for a
    dense draw and ``z`` is symmetric (``u -> -u`` negates it), so estimators built on either are unbiased;
    a SPSA estimate's ``E||g||^2`` grows by ``(m+2)(n+2)/(mn+2)`` (4% for a 64 x 256 linear), while a
    draw costs ``m + n`` normals instead of ``mn``. Normals come from :func:`gaussian`, block after block
    along the draw's stream.

    >>> keys = draw_keys(0, 1, 2, torch.tensor([5]), torch.tensor([0]))
    >>> z = NoiseLayout(((2, 3), (4, 0))).make(keys)
    >>> u, v = gaussian(keys, 5)[0].split([2, 3])
    >>> z.shape, bool(torch.equal(z[0, :6], torch.outer(u, v).flatten()))
    (torch.Size([1, 10]), True)
    """

    blocks: tuple[tuple[int, int], ...]
    """``(m, n)`` per block: ``n > 0`` a rank-1 ``m x n`` block, ``n == 0`` ``m`` dense coordinates."""
    slice_size: int = SLICE
    """Coordinates of a canonical slice (:attr:`slices`)."""

    @classmethod
    def dense(cls, size: int) -> NoiseLayout:
        """``size`` independent normals."""
        return cls(((size, 0),))

    @classmethod
    def of(cls, shapes: Sequence[torch.Size], rank1: bool) -> NoiseLayout:
        """The layout of parameters of ``shapes`` flattened in order; ``rank1``: matrices (``out x in...``, a
        convolution's trailing dimensions folded into ``in``) get rank-1 blocks."""
        if not rank1:
            return cls.dense(sum(math.prod(s) for s in shapes))
        return cls(tuple((s[0], math.prod(s[1:])) if len(s) >= 2 else (math.prod(s), 0) for s in shapes))

    @property
    def size(self) -> int:
        """Coordinates of a draw."""
        return sum(m * max(n, 1) for m, n in self.blocks)

    @property
    def normals(self) -> int:
        """Normals a draw takes from its stream."""
        return sum(m + n for m, n in self.blocks)

    @property
    def dense_only(self) -> bool:
        """One dense block: a draw is its stream."""
        return len(self.blocks) == 1 and self.blocks[0][1] == 0

    @property
    def sources(self) -> tuple[int, ...]:
        """Where each block's normals start in a draw's stream (a rank-1 block: ``u`` then ``v``)."""
        starts = [0]
        for m, n in self.blocks[:-1]:
            starts.append(starts[-1] + m + n)
        return tuple(starts)

    def make(self, keys: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(D, size)`` the draws ``keys`` on ``keys``' device (row ``d`` depends only on ``keys[d]``)."""
        if self.dense_only:
            return gaussian(keys, self.size, dtype)
        out = self.expand(gaussian(keys, self.normals))
        return out if dtype == torch.float32 else out.to(dtype)

    def expand(self, stream: torch.Tensor) -> torch.Tensor:
        """``(D, size)`` float32 draws from their ``(D, normals)`` streams (the stream itself if all dense)."""
        if self.dense_only:
            return stream
        out = torch.empty(len(stream), self.size, dtype=torch.float32, device=stream.device)
        dst = 0
        for (m, n), src in zip(self.blocks, self.sources):
            if n:
                u, v = stream[:, src : src + m], stream[:, src + m : src + m + n]
                torch.mul(u[:, :, None], v[:, None, :], out=out[:, dst : dst + m * n].view(-1, m, n))
            else:
                out[:, dst : dst + m] = stream[:, src : src + m]
            dst += m * max(n, 1)
        return out

    @functools.cached_property
    def slices(self) -> tuple[Slice, ...]:
        """The draw's canonical slices, in flat order: a dense block cut every :attr:`slice_size` coordinates, a
        rank-1 block ``(m, n)`` every ``slice_size // n`` rows (at least one)."""
        out, offset = [], 0
        for b, (m, n) in enumerate(self.blocks):
            step = max(1, self.slice_size // n) if n else self.slice_size
            for lo in range(0, m, step):
                hi = min(m, lo + step)
                out.append(Slice(b, lo, hi, offset + lo * max(n, 1), (hi - lo) * max(n, 1)))
            offset += m * max(n, 1)
        return tuple(out)

    def streams_of(self, piece: Slice) -> tuple[int, int]:
        """Where ``piece``'s normals sit in a draw's stream: its own (``u``'s rows or its coordinates) start and
        count; a rank-1 block's ``v`` follows its ``u`` (:attr:`sources`)."""
        return self.sources[piece.block] + piece.lo, piece.hi - piece.lo

    def weigh(self, keys: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
        """``(size,)`` float32 ``sum_d coefs[d] z_d`` of the draws ``keys``, a rank-1 block as ``(rows, D) @ (D, n)``
        matmuls without forming its draws."""
        return self.weigh_streams(gaussian(keys, self.normals), coefs)

    def weigh_streams(self, stream: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
        """:meth:`weigh` of draws given by their ``(D, normals)`` streams, slice by slice (:attr:`slices`), so any
        slice weighed alone (:meth:`weigh_slice`) gives the same bits."""
        parts = []
        for piece in self.slices:
            src, count = self.streams_of(piece)
            m, n = self.blocks[piece.block]
            v = stream[:, self.sources[piece.block] + m :][:, :n] if n else None
            parts.append(_weigh(stream[:, src : src + count], v, coefs))
        return torch.cat(parts)

    def weigh_slice(self, keys: torch.Tensor, coefs: torch.Tensor, piece: Slice) -> torch.Tensor:
        """``(piece.size,)`` the coordinates of :meth:`weigh` that ``piece`` covers, making only its normals (a
        rank-1 slice's rows of ``u`` and its block's ``v``)."""
        src, count = self.streams_of(piece)
        m, n = self.blocks[piece.block]
        v = gaussian(keys, n, start=self.sources[piece.block] + m) if n else None
        return _weigh(gaussian(keys, count, start=src), v, coefs)

    def coordinates(self, stream: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(D, K)`` the draws at flat coordinates ``idx (K,)``, from their ``(D, normals)`` streams without
        forming the draws (a rank-1 coordinate ``(i, j)`` is ``u_i v_j``)."""
        if self.dense_only:
            return stream[:, idx]
        first, second, dst = torch.empty_like(idx), torch.empty_like(idx), 0
        ones = stream.shape[1]  # the index of a column of ones appended to the streams
        for (m, n), src in zip(self.blocks, self.sources):
            inside = (idx >= dst) & (idx < dst + m * max(n, 1))
            local = idx[inside] - dst
            if n:
                first[inside], second[inside] = src + local // n, src + m + local % n
            else:
                first[inside], second[inside] = src + local, ones
            dst += m * max(n, 1)
        padded = torch.cat([stream, torch.ones_like(stream[:, :1])], dim=1)
        return padded[:, first] * padded[:, second]
