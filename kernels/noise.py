"""Rounding noise for stochastic rounding: a counter-based hash of the element index, keyed by a per-tensor seed.

Why a hash and not Inductor's RNG: ``inductor_random`` is realized as a buffer of its own (on the Triton
backend a kernel that only writes noise, read back by the pack), and it reads its seed as ``seeds[k]`` with
the tensor's index k compiled into the kernel, so identical layers stop sharing kernels. A hash of the
index is plain integer arithmetic that Inductor inlines into the kernel that uses it, and its key is a
one-element tensor of its own per quantized tensor (``actc::seeds``): a kernel argument, not a constant.

``hash_noise`` is traced into the graphs by ``kernels/quant.quantize``; ``actc::seeds`` draws the keys
(``passes/rewrite.py`` inserts one call per device). ``reference_hash_noise`` at the bottom computes the same
numbers in Python integers; tests/test_noise.py compares the two bit for bit and tests the uniformity.
"""
from __future__ import annotations

import math

import torch


_M32 = 0xFFFFFFFF
# The 32-bit finalizer [16 21f0aaad 15 735a2d97 15] from Chris Wellons' hash-prospector, a bijection of
# [0, 2^32). Both multipliers are < 2^31, so each product of a 32-bit value fits in int64 (no overflow).
_MIX = ((16, 0x21F0AAAD), (15, 0x735A2D97))
_FINAL_SHIFT = 15


def _mix32(h):  # an int64 tensor or a Python int, in [0, 2^32)
    for shift, mul in _MIX:
        h = ((h ^ (h >> shift)) * mul) & _M32
    return h ^ (h >> _FINAL_SHIFT)


def hash_noise(shape, seed: torch.Tensor) -> torch.Tensor:
    """U[0, 1) fp32 of ``shape`` (the element at flat index i from i and the int64 ``seed``), 24 bits each.

    u(i) = (H(H(i_lo ^ k1) ^ k2') >> 8) / 2^24, with H = ``_mix32``, (k1, k2) the seed's 32-bit halves,
    (i_lo, i_hi) the index's and k2' = (k2 + i_hi) mod 2^32 (i_hi is 0 below 2^32 elements, and then left
    out of the code). For one key the map is a bijection of i_lo: no two elements of a tensor share an
    input. Two keys' streams are permutations of each other (any keyed 32-bit bijection gives that); the
    gradient's bias argument needs a permutation without structure, so that a product of two tensors' errors
    at related positions averages to 0. k2 enters between the rounds, so keys with different k2 pair
    elements at unrelated positions (H(i + k) would pair them by a shift). Keys that share k2 would pair
    i with i ^ (k1 ^ k1'): the seeds must be random 64-bit numbers, as ``actc::seeds`` draws them (a shared
    k2 has probability 2^-32 per pair of tensors), not a counter. Unbiased rounding needs u uniform: tested
    by chi-square over bins, by the correlation of neighbours and of tensors (tests/test_noise.py).
    """
    numel = math.prod(shape)
    i = torch.arange(numel, dtype=torch.int64, device=seed.device).view(shape)
    k1, k2 = seed & _M32, (seed >> 32) & _M32
    if not (isinstance(numel, int) and numel <= 1 << 32):  # fewer ops in every kernel that rounds
        k2 = (k2 + (i >> 32)) & _M32
        i = i & _M32
    h = _mix32(_mix32(i ^ k1) ^ k2)
    return (h >> 8).to(torch.float32) * 2.0**-24


@torch.library.custom_op("actc::seeds", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def seeds(count: int, device: torch.device, after: list[torch.Tensor]) -> list[torch.Tensor]:
    """``count`` int64 seeds, each a 0-d tensor of its own (its own kernel argument), drawn from torch's
    generator of ``device`` in one call, as Inductor draws its own seeds.

    ``after`` is read by nobody: it holds the graph's own seeds (``prims.inductor_seeds``), so that this
    draw depends on theirs. The order of the two calls in the FX graph is not enough: Inductor's scheduler
    may emit two independent calls in either order, and a draw of actc's first would shift every dropout
    mask of the step (the forward then differs from Inductor's)."""
    drawn = torch.randint(-2**63, 2**63 - 1, (count,), dtype=torch.int64, device=device)
    out = [torch.empty((), dtype=torch.int64, device=device) for _ in range(count)]
    torch._foreach_copy_(out, list(drawn.unbind()))
    return out


@seeds.register_fake
def _(count, device, after):
    return [torch.empty((), dtype=torch.int64, device=device) for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# reference: the same numbers in Python integers (tests only)
# --------------------------------------------------------------------------------------------------
def reference_hash_noise(seed: int, indices) -> torch.Tensor:
    """``hash_noise`` at the given flat indices, in Python integers (tests only; ``_mix32`` takes ints too)."""
    k1, k2 = seed & _M32, (seed >> 32) & _M32
    return torch.tensor([(_mix32(_mix32((i & _M32) ^ k1) ^ ((k2 + (i >> 32)) & _M32)) >> 8) * 2.0**-24
                         for i in indices], dtype=torch.float32)
