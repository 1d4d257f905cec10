"""Eager compression of one tensor: ``compress(t) -> Compressed`` and ``decompress(c) -> Tensor``.

Floating tensors (fp32 / fp16 / bf16) are quantized group-wise with stochastic rounding
(``actc::quantize``: the Triton kernels on GPU, the aten code of ``actc.kernels.quant`` on CPU), so
``E[decompress(compress(t))] == t``. Bool tensors are packed exactly, 1 bit an element.

The tensor is flattened in memory order, so a dense tensor of any strides (transposed, channels-last)
is compressed without a copy and comes back with its shape, dtype and strides. A non-dense one (a
strided slice, an expanded view) is copied first and comes back dense.

Importing this module needs no Triton: the custom ops fall back to aten where it is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .kernels import quant
from .kernels import triton_dequantize, triton_quantize  # noqa: F401  (register actc::quantize / dequantize)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Compressed:
    """One compressed tensor.

    codes: uint8 [ng, group*bits//8] quantized codes, or uint8 [ceil(numel/8)] for a bool mask
    meta:  [ng, 2] (lo, scale) in ``quant.meta_dtype(dtype)``; None for a bool mask
    shape, perm: the logical shape and the memory order of its dims (``quant.memory_order``)
    dtype, bits, group, numel: the original dtype, the code width (1 for a mask), the group size,
    and the element count
    """

    codes: torch.Tensor
    meta: Optional[torch.Tensor]
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: torch.dtype
    bits: int
    group: int
    numel: int

    @property
    def is_mask(self) -> bool:
        """True for an exact 1-bit bool mask (no meta)."""
        return self.meta is None

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus per-group metadata."""
        size = self.codes.numel() * self.codes.element_size()
        if self.meta is not None:
            size += self.meta.numel() * self.meta.element_size()
        return size


def _check_tensor(t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype != torch.bool and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={t.dtype} is not supported; valid: {FLOAT_DTYPES + (torch.bool,)}")


def compress(t: torch.Tensor, bits: int = 2, group: int = quant.DEFAULT_GROUP, *,
             noise: Optional[torch.Tensor] = None) -> Compressed:
    """Compress ``t`` to ``bits`` bits an element in groups of ``group`` (bool tensors: an exact mask).

    ``noise``: optional fp32 [ceil(numel/group), group] uniform [0, 1) noise, indexed by the element's
    position in memory order; given it, the result is deterministic (and the same on every backend).
    """
    _check_tensor(t)
    quant.check_format(bits, group)
    shape = tuple(t.shape)
    perm = quant.memory_order(shape, t.stride())
    flat = quant.flatten_in_memory_order(t.detach(), perm)
    if t.dtype == torch.bool:
        if noise is not None:
            raise ValueError("noise must be None for a bool tensor (masks are packed exactly)")
        return Compressed(quant.pack_mask(flat), None, shape, perm, torch.bool, 1, 8, flat.numel())
    codes, meta = torch.ops.actc.quantize(flat, bits, group, noise, None)
    return Compressed(codes, meta, shape, perm, t.dtype, bits, group, flat.numel())


def decompress(c: Compressed) -> torch.Tensor:
    """The tensor ``c`` was made from (up to quantization noise), with its shape, dtype and strides."""
    if not isinstance(c, Compressed):
        raise TypeError(f"c must be a Compressed; got {type(c).__name__}")
    if c.is_mask:
        flat = quant.unpack_mask(c.codes, c.numel)
    else:
        flat = torch.ops.actc.dequantize(c.codes, c.meta, c.bits, c.numel, c.dtype)
    return quant.restore_layout(flat, c.shape, c.perm)
