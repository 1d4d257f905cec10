"""Quantize: one Triton kernel, its launcher and custom op ``actc::quantize``, and the torch reference.

The format is ``quant.py``'s (codes uint8 [ng, G*bits//8], meta [ng, 2] = (lo, scale)). Given the same
noise the kernel is bit-identical to ``quant.quantize`` (see ``_triton.py`` for how). The noise is either
read from a tensor (fp32 [ng, G], as quant.quantize takes it) or drawn in the kernel from Philox 4x32
(``tl.rand4x(seed, o // 4)``, number o % 4 for the element at offset o: a quarter of the RNG work of one
call per element, which made the kernel compute-bound on an H200), so that no noise tensor is written or
read.

Not matched: the sign of a zero lo (torch's amin keeps whichever zero its reduction order meets first;
codes and values never depend on it) and NaN bit patterns. Not verified without a GPU: on NVIDIA,
``tl.math.div_rn`` is reported to lower to ``div.rn.ftz.f32``, which flushes a subnormal 1 / scale
(scale >= 2^126, values near the fp32 / bf16 max) to 0 (tests/test_triton_kernels.py::test_cuda_extremes).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import quant
from ._triton import (DTYPES, META_MAX, grid, on_device, require_triton, triton, tl,
                      use_triton)

# --------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------
if triton is not None:
    from ._triton import round_bf16

    _SAFETY = tl.constexpr(quant._SAFETY)  # jit code reads globals only as constexpr

    @triton.jit
    def _finite(v):
        return (v - v) == 0  # false for ±inf and NaN

    @triton.jit(do_not_specialize=["seed"])
    def _quantize_kernel(x_ptr, noise_ptr, codes_ptr, meta_ptr, numel, num_groups, seed, meta_max, x_max,
                         GROUP: tl.constexpr, BITS: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
                         X_BF16: tl.constexpr, HAS_NOISE: tl.constexpr, ROUND_LO: tl.constexpr,
                         META_BF16: tl.constexpr):
        """One program quantizes GROUPS_PER_PROGRAM groups; meta_ptr (and x_ptr if X_BF16) are int16 views."""
        PER: tl.constexpr = 8 // BITS
        NBYTES: tl.constexpr = GROUP * BITS // 8
        LEVELS: tl.constexpr = (1 << BITS) - 1
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        group_ok = groups < num_groups
        offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # int64 [groups, GROUP]
        valid = offs < numel
        if X_BF16:  # bf16 bits are the high half of the fp32 bits (exact, subnormals included)
            x = (tl.load(x_ptr + offs, mask=valid, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        nan = valid & (x != x)
        lo = tl.min(tl.where(valid & ~nan, x, float("inf")), axis=1)  # least non-NaN value
        hi = tl.max(tl.where(valid & ~nan, x, -float("inf")), axis=1)
        has_nan = tl.max(nan.to(tl.int32), axis=1) > 0
        hi = tl.where(has_nan, float("nan"), hi)  # NaN if the group holds one, as torch's amax
        lo = tl.where(group_ok, lo, 0.0)  # groups past the end: finite, never stored
        hi = tl.where(group_ok, hi, 0.0)
        lo_raw = lo

        # lo: a value of the tensor (exact in a 2-byte dtype), or, for fp32 input, moved down and rounded
        if ROUND_LO:
            lo = lo - tl.abs(lo) * _SAFETY
        if META_BF16:
            b = round_bf16(lo)
            lo_q = b.to(tl.float32, bitcast=True)
            lo_bits = (b >> 16).to(tl.int16)
        else:
            lo_h = lo.to(tl.float16)
            lo_q = lo_h.to(tl.float32)
            lo_bits = lo_h.to(tl.int16, bitcast=True)

        # scale: rounded up by (1 + 2^-7), clamped to the meta dtype's max, rounded to it
        levels = tl.full(hi.shape, LEVELS, tl.float32)
        scale = tl.math.div_rn(hi - lo_q, levels) * (1 + _SAFETY)
        # endpoint groups (quant.py's docstring): meta = (b, a), or (-b, -a) when neither breaks the normal form
        special = ~_finite(lo_q) | ~_finite(scale) | (scale > meta_max) | (hi * 0.5 - lo_raw * 0.5 > x_max / 4) | has_nan
        if META_BF16 and ROUND_LO:  # fp32 endpoints into bf16 meta: toward zero, NaN kept
            a_s = tl.where(lo_raw == lo_raw, (lo_raw.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True), lo_raw)
            b_s = tl.where(hi == hi, (hi.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True), hi)
        else:
            a_s = lo_raw
            b_s = hi
        negate = (a_s.to(tl.int32, bitcast=True) >= 0) & _finite(b_s)
        end0 = tl.where(negate, -b_s, b_s)
        end1 = tl.where(negate, -a_s, a_s)
        scale = tl.where(special, 0.0, scale)
        scale = tl.where(scale > meta_max, meta_max, scale)  # clamp(max=)
        lo_q = tl.where(special, 0.0, lo_q)
        if META_BF16:
            lo_bits = tl.where(special, (end0.to(tl.int32, bitcast=True) >> 16).to(tl.int16), lo_bits)
        else:
            lo_bits = tl.where(special, end0.to(tl.float16).to(tl.int16, bitcast=True), lo_bits)
        if META_BF16:
            b = round_bf16(scale)
            scale_q = b.to(tl.float32, bitcast=True)
            scale_bits = (b >> 16).to(tl.int16)
            scale_bits = tl.where(special, (end1.to(tl.int32, bitcast=True) >> 16).to(tl.int16), scale_bits)
        else:
            scale_h = scale.to(tl.float16)
            scale_q = scale_h.to(tl.float32)
            scale_bits = scale_h.to(tl.int16, bitcast=True)
            scale_bits = tl.where(special, end1.to(tl.float16).to(tl.int16, bitcast=True), scale_bits)
        nonzero = scale_q > 0
        inv = tl.math.div_rn(tl.full(hi.shape, 1.0, tl.float32), tl.where(nonzero, scale_q, 1.0))
        inv = tl.where(nonzero, inv, 0.0)

        if HAS_NOISE:
            u = tl.load(noise_ptr + offs, mask=group_ok[:, None], other=0.0)
        else:  # Philox 4x32 gives four numbers a call: element o takes number o % 4 of call o // 4
            quads = groups[:, None] * (GROUP // 4) + tl.arange(0, GROUP // 4)[None, :]  # int64
            u0, u1, u2, u3 = tl.rand4x(seed, quads)
            u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [.., GROUP // 4, 2, 2]: [k, m] is number 2k + m
            u = tl.reshape(u, (GROUPS_PER_PROGRAM, GROUP))
        q = tl.floor((x - lo_q[:, None]) * inv[:, None] + u)  # the tail is quantized as 0.0, like quant.py
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
        a2 = (a_s * 0.5)[:, None]
        b2 = (b_s * 0.5)[:, None]
        p = tl.where(b2 > a2, tl.math.div_rn(x * 0.5 - a2, tl.where(b2 > a2, b2 - a2, 1.0)), 0.0)
        upper = tl.where(_finite(a2) & _finite(b2), tl.floor(p + u) >= 1,
                         (x != lo_raw[:, None]) & ((x == hi[:, None]) | (x != x) | _finite(hi)[:, None]))
        q = tl.where(special[:, None], tl.where(upper, float(LEVELS), 0.0), q).to(tl.int32)

        # pack: code k of a group at bit (k % PER) * BITS of byte k // PER
        q = tl.reshape(q, (GROUPS_PER_PROGRAM, NBYTES, PER))
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(q << shifts[None, None, :], axis=2).to(tl.uint8)
        code_offs = groups[:, None] * NBYTES + tl.arange(0, NBYTES)[None, :]
        tl.store(codes_ptr + code_offs, packed, mask=group_ok[:, None])
        tl.store(meta_ptr + groups * 2, lo_bits, mask=group_ok)
        tl.store(meta_ptr + groups * 2 + 1, scale_bits, mask=group_ok)


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------
def check_noise(noise: torch.Tensor, num_groups: int, group: int, device: torch.device) -> None:
    """The noise tensor must be fp32 [ng, group] on the data's device."""
    want = (num_groups, group)
    if noise.dtype != torch.float32 or tuple(noise.shape) != want or noise.device != device:
        raise ValueError(f"noise must be float32 of shape {want} on {device}; "
                         f"got {noise.dtype} {tuple(noise.shape)} on {noise.device}")


def launch_quantize(flat: torch.Tensor, bits: int, group: int, noise: Optional[torch.Tensor], seed: int,
                    codes: torch.Tensor, meta: torch.Tensor) -> None:
    """Quantize ``flat`` into preallocated ``codes`` / ``meta`` (exposed for the int64-offset test)."""
    require_triton()
    ng = codes.shape[0]
    per_program, launch_grid = grid(ng, group)
    x_bf16 = flat.dtype == torch.bfloat16
    with on_device(flat):
        _quantize_kernel[launch_grid](
            flat.view(torch.int16) if x_bf16 else flat, flat if noise is None else noise, codes,
            meta.view(torch.int16), flat.numel(), ng, seed, META_MAX[meta.dtype], torch.finfo(flat.dtype).max,
            GROUP=group, BITS=bits, GROUPS_PER_PROGRAM=per_program, X_BF16=x_bf16,
            HAS_NOISE=noise is not None, ROUND_LO=meta.dtype != flat.dtype,
            META_BF16=meta.dtype == torch.bfloat16, enable_fp_fusion=False)


def triton_quantize(flat: torch.Tensor, bits: int, group: int = quant.DEFAULT_GROUP,
                    noise: Optional[torch.Tensor] = None, seed: Optional[int] = None):
    """Triton version of ``quant.quantize``: (codes uint8 [ng, group*bits//8], meta [ng, 2]).

    ``noise`` fp32 [ng, group] gives results bit-identical to quant.quantize; without it the noise is
    drawn in the kernel from Philox keyed by ``seed`` (from torch's generator when None).
    """
    quant.check_format(bits, group)
    if flat.dim() != 1 or flat.dtype not in DTYPES:
        raise ValueError(f"flat must be a 1-D tensor of {DTYPES}; "
                         f"got {flat.dtype} of shape {tuple(flat.shape)}")
    flat = flat.contiguous()
    ng = quant.num_groups(flat.numel(), group)
    if noise is not None:
        check_noise(noise, ng, group, flat.device)
        noise = noise.contiguous()
    elif seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    codes = torch.empty(ng, group * bits // 8, dtype=torch.uint8, device=flat.device)
    meta = torch.empty(ng, 2, dtype=quant.meta_dtype(flat.dtype), device=flat.device)
    if ng:
        launch_quantize(flat, bits, group, noise, seed or 0, codes, meta)
    return codes, meta


@torch.library.custom_op("actc::quantize", mutates_args=())
def quantize_op(flat: torch.Tensor, bits: int, group: int, noise: Optional[torch.Tensor] = None,
                seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(flat, bits, group, noise=None, seed=None) -> (codes, meta): the Triton kernel where it
    runs (``_triton.use_triton``), the torch reference elsewhere. Given ``noise`` both agree bit for bit;
    given only ``seed`` each is reproducible, with its own generator."""
    if use_triton(flat):
        return triton_quantize(flat, bits, group, noise, seed)
    quant.check_format(bits, group)
    ng = quant.num_groups(flat.numel(), group)
    if noise is not None:
        check_noise(noise, ng, group, flat.device)
    elif seed is not None:
        gen = torch.Generator(device=flat.device).manual_seed(seed)
        noise = torch.rand((ng, group), dtype=torch.float32, device=flat.device, generator=gen)
    return reference_quantize(flat, bits, group, noise)


@quantize_op.register_fake
def _(flat, bits, group, noise=None, seed=None):
    ng = quant.num_groups(flat.shape[0], group)
    codes = flat.new_empty((ng, group * bits // 8), dtype=torch.uint8)
    return codes, flat.new_empty((ng, 2), dtype=quant.meta_dtype(flat.dtype))


# --------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------
def reference_quantize(flat: torch.Tensor, bits: int, group: int, noise: Optional[torch.Tensor] = None):
    """The same numbers in torch: ``quant.quantize``, the aten code that Inductor fuses (noise from
    ``torch.rand`` when None). ``quant.reference_quantize`` computes them a third way, element by element;
    the tests compare all three."""
    return quant.quantize(flat, bits, group, noise)
