"""Dequantize: one Triton kernel, its launcher and custom op ``actc::dequantize``, and the torch reference.

x = lo + q * scale, in fp32, then rounded to the output dtype: bit-identical to ``quant.dequantize``
(see ``_triton.py``). The codes and meta are ``quant.py``'s format.
"""
from __future__ import annotations

import torch

from . import quant
from ._triton import DTYPES, grid, on_device, require_triton, triton, tl, use_triton

# --------------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------------
if triton is not None:
    from ._triton import round_bf16

    @triton.jit
    def _dequantize_kernel(codes_ptr, meta_ptr, out_ptr, numel, num_groups, out_max,
                           GROUP: tl.constexpr, BITS: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
                           META_BF16: tl.constexpr, OUT_KIND: tl.constexpr):
        """x = lo + q * scale; meta_ptr is meta's int16 view, OUT_KIND 0/1/2 = fp32/fp16/bf16 (int16 view)."""
        PER: tl.constexpr = 8 // BITS
        NBYTES: tl.constexpr = GROUP * BITS // 8
        LEVELS: tl.constexpr = (1 << BITS) - 1
        groups = tl.program_id(0).to(tl.int64) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        group_ok = groups < num_groups
        code_offs = groups[:, None] * NBYTES + tl.arange(0, NBYTES)[None, :]
        packed = tl.load(codes_ptr + code_offs, mask=group_ok[:, None], other=0).to(tl.int32)
        shifts = tl.arange(0, PER) * BITS
        q = (packed[:, :, None] >> shifts[None, None, :]) & LEVELS
        q = tl.reshape(q, (GROUPS_PER_PROGRAM, GROUP)).to(tl.float32)

        lo_bits = tl.load(meta_ptr + groups * 2, mask=group_ok, other=0)
        scale_bits = tl.load(meta_ptr + groups * 2 + 1, mask=group_ok, other=0)
        if META_BF16:  # bf16 bits are the high half of the fp32 bits
            lo = (lo_bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
            scale = (scale_bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            lo = lo_bits.to(tl.float16, bitcast=True).to(tl.float32)
            scale = scale_bits.to(tl.float16, bitcast=True).to(tl.float32)
        # endpoint groups (quant.py's docstring): meta = (b, a) or (-b, -a); normal ones clamp to the dtype
        special = ~((lo - lo) == 0) | (scale.to(tl.int32, bitcast=True) < 0)
        sign = tl.where(lo < scale, -1.0, 1.0)
        ends = tl.where(q == 0, scale[:, None], lo[:, None]) * sign[:, None]
        x = lo[:, None] + q * scale[:, None]
        x = tl.minimum(tl.maximum(x, -out_max), out_max)
        x = tl.where(special[:, None], ends, x)

        offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        if OUT_KIND == 2:
            tl.store(out_ptr + offs, (round_bf16(x) >> 16).to(tl.int16), mask=offs < numel)
        elif OUT_KIND == 1:
            tl.store(out_ptr + offs, x.to(tl.float16), mask=offs < numel)
        else:
            tl.store(out_ptr + offs, x, mask=offs < numel)


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------
def launch_dequantize(codes: torch.Tensor, meta: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Dequantize into a preallocated 1-D ``out`` (exposed for the int64-offset test)."""
    require_triton()
    ng, nbytes = codes.shape
    group = nbytes * 8 // bits
    per_program, launch_grid = grid(ng, group)
    kind = DTYPES.index(out.dtype)
    with on_device(out):
        _dequantize_kernel[launch_grid](
            codes, meta.view(torch.int16), out.view(torch.int16) if kind == 2 else out, out.numel(), ng,
            torch.finfo(out.dtype).max,
            GROUP=group, BITS=bits, GROUPS_PER_PROGRAM=per_program, META_BF16=meta.dtype == torch.bfloat16,
            OUT_KIND=kind, enable_fp_fusion=False)


def check_parts(codes: torch.Tensor, meta: torch.Tensor, bits: int, numel: int, dtype: torch.dtype) -> None:
    """The codes and meta must be a whole number of groups in quant.py's format, for ``numel`` elements."""
    if bits not in quant.BITS:
        quant.check_format(bits, 8)  # raises, naming the valid widths
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be uint8 [groups, group*bits//8]; got {codes.dtype} {tuple(codes.shape)}")
    quant.check_format(bits, codes.shape[1] * 8 // bits)
    if dtype not in DTYPES or meta.dtype != quant.meta_dtype(dtype):
        raise ValueError(f"dtype must be one of {DTYPES} and meta of quant.meta_dtype(dtype); "
                         f"got dtype={dtype}, meta {meta.dtype}")
    group = codes.shape[1] * 8 // bits
    if tuple(meta.shape) != (codes.shape[0], 2) or not 0 <= numel <= codes.shape[0] * group:
        raise ValueError(f"meta must be [{codes.shape[0]}, 2] and numel at most {codes.shape[0] * group}; "
                         f"got meta {tuple(meta.shape)}, numel={numel}")


def triton_dequantize(codes: torch.Tensor, meta: torch.Tensor, bits: int, numel: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Triton version of ``quant.dequantize``: a 1-D tensor of ``numel`` elements of ``dtype``."""
    check_parts(codes, meta, bits, numel, dtype)
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    if numel:
        launch_dequantize(codes.contiguous(), meta.contiguous(), bits, out)
    return out


@torch.library.custom_op("actc::dequantize", mutates_args=())
def dequantize_op(codes: torch.Tensor, meta: torch.Tensor, bits: int, numel: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """dequantize(codes, meta, bits, numel, dtype) -> a 1-D tensor of ``numel`` elements of ``dtype``: the
    Triton kernel where it runs (``_triton.use_triton``), the torch reference elsewhere."""
    if use_triton(meta):
        return triton_dequantize(codes, meta, bits, numel, dtype)
    check_parts(codes, meta, bits, numel, dtype)
    return reference_dequantize(codes, meta, bits, numel, dtype)


@dequantize_op.register_fake
def _(codes, meta, bits, numel, dtype):
    return codes.new_empty((numel,), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------
def reference_dequantize(codes: torch.Tensor, meta: torch.Tensor, bits: int, numel: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """The same numbers in torch: ``quant.dequantize``, the aten code that Inductor fuses.
    ``quant.reference_dequantize`` computes them a third way, element by element."""
    return quant.dequantize(codes, meta, bits, numel, dtype)
