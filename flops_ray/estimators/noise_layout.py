"""How a noise draw's numbers fill a flat parameter vector (dense or rank-1 blocks), and its canonical slices.

A draw's numbers come from :func:`~flops_ray.estimators.noise.gaussian`, block after block along its stream;
every weighted sum of draws is computed slice by slice, so a slice rebuilt alone (sliced replay) has the bits
of the whole.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flops_ray.estimators.noise import gaussian

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

    >>> from flops_ray.estimators.noise import draw_keys
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
