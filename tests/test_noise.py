"""The rounding noise (kernels/noise.py: ``hash_noise``, ``actc::seeds``): exact against its reference, uniform,
uncorrelated between neighbours and between tensors, and drawn from torch's generator.

Unbiased stochastic rounding needs u ~ U[0, 1) independent of the value it rounds; the bias argument for
the gradient also needs two tensors' errors uncorrelated. A hash passes or fails such tests the same way on
every run (it is deterministic), so each bound below is set at about five standard deviations of the
statistic for truly random numbers: a good hash clears it, a broken mix (a shift or permutation of another
tensor's stream, a constant low byte) misses it by orders of magnitude.
"""
from __future__ import annotations

import math

import pytest
import torch

from actc.kernels import noise as rounding, quant

N = 1 << 16
SEEDS = [0, 1, 2, -1, 0x7FFF_FFFF_FFFF_FFFF, -0x1234_5678_9ABC_DEF0]  # adjacent and extreme keys too


def noise(seed: int, numel: int = N) -> torch.Tensor:
    return rounding.hash_noise((numel,), torch.tensor(seed, dtype=torch.int64))


@pytest.mark.parametrize("seed", SEEDS[:3] + SEEDS[-1:])
def test_matches_python_reference_exactly(seed):
    assert torch.equal(noise(seed, 4096), rounding.reference_hash_noise(seed, range(4096)))


def test_index_beyond_32_bits_does_not_repeat():
    # the index's high half enters the second round: elements 2^32 apart get other numbers
    near, far = rounding.reference_hash_noise(5, [7, 8, (1 << 32) + 7, (1 << 32) + 8]).view(2, 2)
    assert (near != far).all()


def test_compiled_matches_eager_exactly():
    # integer arithmetic: Inductor's C++ kernel must give the same bits as eager
    seed = torch.tensor(SEEDS[-1], dtype=torch.int64)
    compiled = torch.compile(lambda s: rounding.hash_noise((64, 128), s), backend="inductor", dynamic=False)
    assert torch.equal(compiled(seed), rounding.hash_noise((64, 128), seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_chi_square(seed):
    u = noise(seed)
    assert u.min() >= 0 and u.max() < 1
    bins = 256
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    expected = N / bins
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 255 degrees of freedom: mean 255, sd sqrt(510) = 22.6; 5 sd either side
    assert abs(chi2 - (bins - 1)) < 5 * math.sqrt(2 * (bins - 1)), chi2
    # the low byte of the 24 kept bits too (a weak mix leaves patterns there first)
    low = torch.bincount(((u * 2**24).long() & 255), minlength=256).double()
    chi2_low = ((low - expected) ** 2 / expected).sum().item()
    assert abs(chi2_low - 255) < 5 * math.sqrt(510), chi2_low


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lag", [1, 2, 8, 128])  # neighbours, and the same slot of the next group
def test_neighbours_uncorrelated(seed, lag):
    u = noise(seed)
    # for independent uniforms the sample correlation has sd 1/sqrt(N) = 0.0039
    assert abs(_corr(u[:-lag], u[lag:])) < 5 / math.sqrt(N)


@pytest.mark.parametrize("shift", [0, 1, 2, 1000])
def test_tensors_uncorrelated(shift):
    # the keys as actc::seeds draws them, and keys that differ in one bit of their high half: a hash of
    # (i + k) would give one stream shifted by the other (correlation 1 at some shift)
    torch.manual_seed(0)
    drawn = [int(s) for s in torch.ops.actc.seeds(4, torch.device("cpu"), [])]
    for a, b in [(drawn[0], drawn[1]), (drawn[2], drawn[3]), (0, 1 << 32), (5, 5 - (1 << 63))]:
        u, v = noise(a), noise(b)
        assert abs(_corr(u[: N - shift], v[shift:])) < 5 / math.sqrt(N), (a, b, shift)
        assert abs(_corr(v[: N - shift], u[shift:])) < 5 / math.sqrt(N), (a, b, shift)


def test_rounding_with_hash_noise_is_unbiased():
    # E[dequantize(quantize(x))] = x: the mean over 400 seeds approaches x, error shrinking like 1/sqrt(draws)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=g)
    draws = 400
    mean = sum(quant.dequantize(*quant.quantize(x, 2, 128, seed=torch.tensor(s)), 2, x.numel(), x.dtype)
               for s in range(draws)) / draws
    codes, meta = quant.quantize(x, 2, 128, seed=torch.tensor(0))
    step = meta[:, 1].float().repeat_interleave(128)
    # one draw's error is at most a step, with sd <= step/2; the mean of 400 has sd <= step/40: 5 sd allowed
    assert ((mean - x).abs() <= step * 5 / 40).all()


def test_seeds_follow_torch_manual_seed_and_are_separate_tensors():
    torch.manual_seed(3)
    first = torch.ops.actc.seeds(4, torch.device("cpu"), [])
    torch.manual_seed(3)
    again = torch.ops.actc.seeds(4, torch.device("cpu"), [])
    assert [int(s) for s in first] == [int(s) for s in again]
    assert len({int(s) for s in first}) == 4
    # one tensor each: a kernel reads its seed as an argument, so identical layers compile to one kernel
    assert len({s.untyped_storage().data_ptr() for s in first}) == 4 and all(s.dim() == 0 for s in first)
