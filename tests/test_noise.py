"""Counter-based noise: keys match the scalar seed chain, numbers are a pure function of (key, coordinate),
standard normal to within sampling error, independent across draws and coordinates, and the same on a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flops_ray.estimators.noise import draw_keys, gaussian
from flops_ray.estimators.noise_layout import NoiseLayout
from flops_ray.seeding import STREAM_QUERY, derive_seed

N = 1 << 20
"""Numbers per statistical check: a mean's standard error is 1/sqrt(N) ~ 0.001."""


def _reference(key: int, coordinate: int) -> float:
    """The documented construction in plain Python integers: SplitMix-style counter, lowbias32, erfinv."""
    k0, gamma = key & 0xFFFFFFFF, (key >> 32) | 1
    x = (coordinate * gamma + k0) & 0xFFFFFFFF
    for shift, mult in ((16, 0x21F0AAAD), (15, 0xD35A2D97), (15, 1)):
        x = ((x ^ (x >> shift)) * mult) & 0xFFFFFFFF
    v = (2 * (x >> 9) + 1) / 2**23 - 1
    return math.sqrt(2) * torch.erfinv(torch.tensor(v, dtype=torch.float64)).item()


def test_keys_are_the_scalar_seed_chain():
    sample = torch.tensor([0, 1, 5, 2**40, 2**62 - 1])
    draw = torch.tensor([0, 3, 1, 7, 2])
    keys = draw_keys(11, 4, 2, sample, draw).tolist()
    assert keys == [derive_seed(11, STREAM_QUERY, 4, int(s), int(d), 2) for s, d in zip(sample, draw)]


def test_numbers_follow_the_documented_construction():
    keys = draw_keys(3, 0, 1, torch.tensor([9, 10]), torch.tensor([0, 0]))
    z = gaussian(keys, 300_000)
    for d in range(2):
        for c in (0, 1, 2, 65_535, 299_999):
            assert z[d, c].item() == pytest.approx(_reference(int(keys[d]), c), abs=1e-6)


def test_a_draw_is_a_pure_function_of_key_and_coordinate():
    """Alone or among others, short or long (CPU blocks differ), a draw gives the same numbers."""
    keys = draw_keys(0, 2, 0, torch.arange(6), torch.zeros(6, dtype=torch.long))
    many = gaussian(keys, 1_000_003)
    assert torch.equal(gaussian(keys[3:4], 1_000_003), many[3:4])
    assert torch.equal(gaussian(keys, 1_000), many[:, :1_000])
    assert gaussian(keys, 10, torch.float64).dtype == torch.float64


def test_standard_normal_moments():
    """Mean, variance, kurtosis and tails within 5 standard errors of N(0, 1) (errors from the normal's moments)."""
    z = gaussian(draw_keys(1, 0, 0, torch.arange(4), torch.zeros(4, dtype=torch.long)), N // 4).flatten().double()
    se = 1 / math.sqrt(N)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96) * se
    tail = (z.abs() > 2).double().mean().item()  # P(|z| > 2) = 0.0455
    assert abs(tail - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545) * se


def test_draws_and_coordinates_are_uncorrelated():
    """Neighbouring samples, draws and coordinates: every correlation within 5/sqrt(n) of zero."""
    n = N // 4
    keys = draw_keys(0, 0, 0, torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 2]))
    z = gaussian(keys, n).double()
    off = torch.corrcoef(z) - torch.eye(len(z), dtype=z.dtype)
    assert off.abs().max().item() < 5 / math.sqrt(n)
    lag = torch.corrcoef(torch.stack([z[0, 1:], z[0, :-1]]))[0, 1].item()
    assert abs(lag) < 5 / math.sqrt(n)


def test_rank1_draws_have_identity_covariance_and_their_weighted_sum_needs_no_draws():
    """A rank-1 block ``vec(u v^T)``: unit variance, uncorrelated coordinates (``E[z z^T] = I``), kurtosis
    ``E[u^4] E[v^4] = 9``; a dense block beside it is plain normals; ``weigh`` equals ``coefs @ make``."""
    layout = NoiseLayout(((4, 3), (5, 0)))
    n = N // 16
    keys = draw_keys(2, 0, 1, torch.arange(n), torch.zeros(n, dtype=torch.long))
    z = layout.make(keys).double()  # (n, 17)
    se = 1 / math.sqrt(n)
    cov = z.T @ z / n
    # Per draw, Var(z_a z_b) is at most Var(z_a^2) = 9 - 1 = 8; Var(z_a^4) = E[u^8] E[v^8] - 81 = 105^2 - 81.
    # A draw's coordinates are averaged together, so its average varies at most as much as one coordinate.
    assert (cov - torch.eye(17, dtype=z.dtype)).abs().max().item() < 5 * math.sqrt(8) * se
    assert abs((z[:, :12] ** 4).mean().item() - 9) < 5 * math.sqrt(105**2 - 81) * se
    assert abs((z[:, 12:] ** 4).mean().item() - 3) < 5 * math.sqrt(96) * se
    coefs = torch.randn(64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(layout.weigh(keys[:64], coefs), coefs @ layout.make(keys[:64]), rtol=1e-5, atol=1e-5)
    # Trace coordinates from the streams, without the draws: both block kinds, repeats, any order.
    idx = torch.tensor([16, 0, 11, 12, 5, 5, 3])
    streams = gaussian(keys[:8], layout.normals)
    torch.testing.assert_close(layout.coordinates(streams, idx), layout.make(keys[:8])[:, idx])
    assert NoiseLayout.of([torch.Size([4, 3]), torch.Size([5])], rank1=True) == layout
    assert NoiseLayout.of([torch.Size([4, 3]), torch.Size([5])], rank1=False) == NoiseLayout.dense(17)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_draws_match_cpu():
    keys = draw_keys(5, 1, 3, torch.arange(8), torch.arange(8))
    cpu = gaussian(keys, 100_000)
    gpu = gaussian(keys.cuda(), 100_000).cpu()
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=1e-5, atol=1e-5)
