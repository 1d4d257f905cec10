"""What the hand-written Triton kernels share: the import guard, launch geometry, and bf16 rounding.

The kernels themselves, one file per family, each in the order @triton.jit kernel, launcher (with its
``torch.library`` custom op), torch reference: ``triton_quantize.py`` and ``triton_dequantize.py``.

Exactness. All arithmetic is fp32, in the order of ``quant.py``'s aten code, with IEEE division
(``div_rn``) and multiply-add contraction disabled at launch (``enable_fp_fusion=False``), so that no FMA
changes a rounding. fp32 -> bf16 is rounded to nearest even with integer ops, as ``Tensor.to`` does (the
Triton interpreter's own bf16 cast truncates); bf16 values travel through int16 views. Offsets are int64
(program ids are widened before any multiply), so tensors over 2^31 elements index right.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (triton.jit chooses between compiling and interpreting when it decorates a kernel, and Triton's
own jit'd library -- tl.sum, tl.rand -- is decorated when triton is imported).
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # the custom ops still register, with their aten fallback, where Triton is not installed
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_ELEMENTS = 4096  # elements per program: a whole number of groups (groups are powers of two <= 1024)
META_MAX = {dt: torch.finfo(dt).max for dt in (torch.bfloat16, torch.float16)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRETED = triton is not None and interpreting()  # decided when triton was imported (above)


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors, and for CPU ones while TRITON_INTERPRET=1 (set before triton's import)."""
    return triton is not None and t.dtype in DTYPES and (t.is_cuda or (INTERPRETED and interpreting()))


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use actc.kernels.quant.quantize / dequantize")


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def grid(num_groups: int, group: int) -> tuple[int, tuple[int]]:
    """(groups per program, launch grid)."""
    per_program = max(1, BLOCK_ELEMENTS // group)
    return per_program, ((num_groups + per_program - 1) // per_program,)


if triton is not None:
    @triton.jit
    def round_bf16(x):
        """fp32 -> the uint32 bits of the nearest bf16 (ties to even) in the high half; NaN -> 0x7FC0."""
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + (0x7FFF + ((b >> 16) & 1))) >> 16) << 16
        return tl.where(x == x, b, 0x7FC00000)
