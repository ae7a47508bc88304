"""Gradient-quality telemetry of a step, from what its queries return: the estimate's signal-to-noise ratio and
the cosine between consecutive estimates (:meth:`~flops_ray.step.forward.ForwardStep` fills the report's fields).
"""

from __future__ import annotations

import numpy as np


def filled(traces: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """``(B,)`` measured traces, a sample without one (a single draw) taking the allocator's ``signal`` for it,
    scaled to the measured ones (``sum measured / sum signal`` over the samples measured); without a usable signal,
    the mean of the measured traces. All NaN when none was measured.

    The samples left unmeasured are those the allocation gave the fewest queries, the small traces: the batch's
    mean would overstate them.

    >>> filled(np.array([2.0, np.nan, 6.0]), np.array([1.0, 0.5, 3.0])).tolist()
    [2.0, 1.0, 6.0]
    >>> filled(np.array([1.0, np.nan, 3.0]), np.full(3, np.nan)).tolist()
    [1.0, 2.0, 3.0]
    """
    known = np.isfinite(traces)
    if not known.any() or known.all():
        return traces
    if np.isfinite(signal).all() and signal[known].sum() > 0:
        guess = signal * (traces[known].sum() / signal[known].sum())
    else:
        guess = np.full_like(traces, traces[known].mean())
    return np.where(known, traces, guess)


def signal_to_noise(norm: float, traces: np.ndarray, used: np.ndarray) -> float:
    """``|g|^2 / tr Var(g)`` of a batch estimate ``g`` with L2 norm ``norm``: ``tr Var(g) = (1/B^2) sum_j T_j / A_j``
    (Theorem 1) on the ``(B,)`` traces; NaN without traces or a norm. Its mean is ``1 + |E g|^2 / tr Var(g)``:
    near 1 the estimate is noise.

    >>> signal_to_noise(1.0, np.array([2.0, 2.0]), np.array([2, 2]))
    2.0
    """
    variance = float((traces / used).sum()) / len(traces) ** 2
    return norm**2 / variance if np.isfinite(norm) and variance > 0 else float("nan")


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Cosine between two estimates of a group's gradient; NaN when either is missing or zero."""
    if a is None or b is None:
        return float("nan")
    scale = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / scale if scale > 0 else float("nan")
