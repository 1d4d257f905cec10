"""Group-wise stochastic quantization written as plain aten-level torch code.

These functions are traced with ``make_fx`` and inlined into the partitioned forward and backward
graphs (``actc.passes.rewrite``), so Inductor fuses them into the kernels around them. They are also
callable eagerly. ``reference_quantize`` / ``reference_dequantize`` at the bottom compute the same
result a second, slower and more obvious way; the tests compare the two bit for bit.

Format of one compressed tensor of ``n`` elements, viewed flat in memory order, ``G`` elements a group:

    codes : uint8 [ng, G * bits // 8]   ng = ceil(n / G); code k of a group sits in byte k // (8 // bits),
                                         at bit (k % (8 // bits)) * bits (little end first)
    meta  : [ng, 2] (lo, scale)          in the tensor's dtype, or bf16 when that is smaller (fp32 input)

    quantize:   q = clamp(floor((x - lo) / scale + u), 0, 2^bits - 1),   u ~ U[0, 1)
    dequantize: x' = lo + q * scale                                          E[x'] = x

``lo`` is rounded down and ``scale`` up when they are stored in a narrower dtype, so every element
stays inside [lo, lo + (2^bits - 1) * scale] and the rounding stays unbiased. Bool masks are packed
8 to a byte, exactly. Everything is computed in fp32.

Values no step can hold. A group that holds ±inf or NaN, or whose range is more than half the dtype's (an
attention mask of 0 and -inf, padding at the dtype's minimum, a value at its max) has no useful step: the
scale would overflow, or put values of ordinary size a third of the dtype's range away from themselves.
Such a group is an endpoint group, stored by its two endpoints: a = its least non-NaN value and b = its
greatest value (NaN if it holds one). A normal group has a finite ``lo`` and a ``scale`` with a clear sign
bit; an endpoint group is told apart by breaking that, as meta = (b, a) when a < 0 or b is not finite,
and as (-b, -a) otherwise (then -b < -a, while b >= a in the first form, so the decoder can tell which).
Each element of an endpoint group is stored as code 0 (a) or 2^bits - 1 (b):

    a and b finite:  code = (2^bits - 1) * floor(p + u),  p = (x - a) / (b - a)       E[x'] = x
    otherwise:       x == a -> a;  x == b or NaN -> b;  other finite x -> b if b is finite, else a

So ±inf, NaN, the dtype's min and max, and every such group of at most two distinct values come back
exactly, and a finite one stays unbiased. What no format of this size can hold is a group with an
infinite endpoint and other finite values: they come back as a finite endpoint where there is one, and
``passes/candidates.py`` keeps the tensors that can hold such values exact. For fp32 input the endpoints
are stored in bf16 meta, rounded toward zero: ±inf, NaN, 0 and bf16 values exactly, fp32 values beyond
bf16's max as bf16's max (finite, same sign). Near the dtype's max a normal group's rounded-up scale can
put the top code past it: the dequantize clamps to the dtype's range (only values that would overflow).
"""
from __future__ import annotations

import math

import torch

from actc.kernels.noise import hash_noise

DEFAULT_GROUP = 128
BITS = (1, 2, 4, 8)
# lo - |lo| * 2^-7 rounds to <= lo, and s * (1 + 2^-7) rounds to >= s, in bf16 (relative step 2^-8) and fp16.
_SAFETY = 2.0**-7


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of (lo, scale): the tensor's own dtype, or bf16 where that is smaller."""
    return dtype if torch.empty((), dtype=dtype).element_size() <= 2 else torch.bfloat16


def check_format(bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; valid: {BITS}")
    if group < 8 or group > 1024 or group & (group - 1):
        raise ValueError(f"group={group!r} is not supported; valid: a power of two from 8 to 1024")


def num_groups(numel, group: int):
    return (numel + group - 1) // group


def compressed_bytes(numel: int, bits: int, group: int, dtype: torch.dtype) -> int:
    """Bytes stored for a tensor of ``numel`` elements at ``bits`` (codes plus per-group metadata)."""
    ng = num_groups(numel, group)
    meta_size = torch.empty((), dtype=meta_dtype(dtype)).element_size()
    return ng * group * bits // 8 + ng * 2 * meta_size


def mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


# --------------------------------------------------------------------------------------------------
# aten-level implementation (traced into the graphs)
# --------------------------------------------------------------------------------------------------
def _groups(flat: torch.Tensor, group: int, fill: float) -> torch.Tensor:
    """[n] -> [ng, group], the tail padded with ``fill``."""
    n = flat.shape[0]
    pad = num_groups(n, group) * group - n
    if isinstance(pad, int) and pad == 0:
        return flat.view(-1, group)
    return torch.nn.functional.pad(flat, (0, pad), value=fill).view(-1, group)


def quantize(flat: torch.Tensor, bits: int, group: int = DEFAULT_GROUP, noise: torch.Tensor | None = None,
             seed: torch.Tensor | None = None, triton: bool = False):
    """Quantize a 1-D tensor. Returns (codes uint8 [ng, group*bits//8], meta [ng, 2]).

    ``noise``: uniform [0, 1) fp32 of shape [ng, group]. Without it, ``hash_noise(seed)`` when a ``seed`` is
    given (what the compiled graphs use), else ``torch.rand``. Two spellings of the same bytes, one per
    Inductor backend. ``triton=True``: the codes are packed by ``_pack_in_group`` (see there) and computed
    from the per-group values as they are (a Triton kernel computes those once per group). Otherwise, for
    the C++ backend: packed by ``_pack``, and computed from the stored meta read back, since a C++ kernel
    would recompute the whole per-group chain for every vector of elements (code size and compile time).
    """
    mdt = meta_dtype(flat.dtype)
    levels = (1 << bits) - 1
    x = flat.float()
    lo = _groups(torch.where(x != x, math.inf, x), group, math.inf).amin(dim=1)  # least non-NaN value
    hi = _groups(x, group, -math.inf).amax(dim=1)                                   # NaN if the group holds one
    if mdt == flat.dtype:  # lo is a value of the tensor: exact in its own dtype
        lo_q = lo
    else:
        lo_q = _round_to_bf16(lo - lo.abs() * _SAFETY)
    scale = (hi - lo_q) / levels * (1 + _SAFETY)
    # endpoint groups (module docstring); halves keep b - a finite
    big = torch.finfo(flat.dtype).max
    # scale >= 0, +inf or NaN (lo_q <= lo <= hi), and NaN or infinite whenever lo_q is not finite or hi is NaN
    special = ~(scale <= torch.finfo(mdt).max) | (hi * 0.5 - lo * 0.5 > big / 4)
    a_s, b_s = _toward_zero(lo, mdt), _toward_zero(hi, mdt)
    negate = ~torch.signbit(a_s) & torch.isfinite(b_s)
    scale = torch.where(special, 0.0, scale).clamp(max=torch.finfo(mdt).max)
    scale_q = _round_to_bf16(scale) if mdt == torch.bfloat16 else scale.to(mdt).float()
    lo_s = torch.where(special, torch.where(negate, -b_s, b_s), lo_q)  # values of mdt: stored exactly
    scale_s = torch.where(special, torch.where(negate, -a_s, a_s), scale_q)
    meta = torch.stack([lo_s.to(mdt), scale_s.to(mdt)], dim=1)
    # The codes are computed from (lo, scale) as stored, decoded as `dequantize` decodes them. Same values: a
    # normal group stores lo_q and scale_q exactly; an endpoint group's stored (a, b) differ from (lo, hi)
    # only where they are finite, and a finite endpoint is compared with x only in a finite group.
    lo_m, s_m = (lo_s[:, None], scale_s[:, None]) if triton else (meta[:, 0:1].float(), meta[:, 1:2].float())
    special, sign = _endpoint_form(lo_m, s_m)
    a, b = s_m * sign, lo_m * sign
    inv = torch.where(s_m > 0, 1.0 / s_m, 0.0)
    xg = _groups(x, group, 0.0)
    if noise is None:
        noise = hash_noise(xg.shape, seed) if seed is not None else \
            torch.rand(xg.shape, dtype=torch.float32, device=flat.device)
    q = torch.floor((xg - lo_m) * inv + noise).clamp(0, levels)
    # endpoint codes (module docstring). Finite a < b: p in [0, 1], halves keep b - a finite. Otherwise the
    # upper code goes to NaN and to x > t: t = a when a = -inf and b is finite (every other x is finite),
    # the largest finite value when b = +inf, and +inf (NaN only) when b is NaN or a = +inf
    a2, b2 = a * 0.5, b * 0.5
    t = torch.where((b != b) | (a == math.inf), math.inf, torch.where(b == math.inf, torch.finfo(torch.float32).max, a))
    upper = torch.where(torch.isfinite(a2) & torch.isfinite(b2), torch.floor((xg * 0.5 - a2) / (b2 - a2) + noise) >= 1,
                        (xg > t) | (xg != xg))
    q = torch.where(special, torch.where(upper, float(levels), 0.0), q)
    codes = _pack_in_group(q, bits) if triton else _pack(q.to(torch.int32), bits)
    return codes, meta


def _toward_zero(v: torch.Tensor, mdt: torch.dtype) -> torch.Tensor:
    """fp32 -> a value of ``mdt`` no farther from zero (bf16: the high half of the bits; NaN, ±inf and
    bf16 values unchanged), still in fp32. fp16/bf16 meta holds values of the tensor itself: exact."""
    if mdt != torch.bfloat16:
        return v
    cut = (v.view(torch.int32) & -65536).view(torch.float32)
    return torch.where(v != v, v, cut)


def _round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest bf16 value (ties to even), still in fp32, computed on the bits.

    ``x.to(bf16).float()`` would be the obvious spelling, but Inductor drops such a round trip inside a fused
    kernel (it does not emulate precision casts), so the codes would be computed against an fp32 lo/scale
    while the dequantize reads the stored bf16 ones: a deterministic error. Integer ops are kept."""
    b = x.view(torch.int32)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.view(torch.float32)


def dequantize(codes: torch.Tensor, meta: torch.Tensor, bits: int, numel, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`: a 1-D tensor of ``numel`` elements of ``dtype``."""
    q = _unpack(codes, bits).float()
    m = meta.float()
    lo, scale = m[:, 0:1], m[:, 1:2]
    special, sign = _endpoint_form(lo, scale)
    big = torch.finfo(dtype).max
    # select, then multiply: selecting between the two products added 200 KB to conv -> BN -> ReLU's Triton
    # backward (test_triton_path's added-bytes test failed)
    x = torch.where(special, torch.where(q == 0, scale, lo) * sign, (lo + q * scale).clamp(-big, big))
    return x.reshape(-1)[:numel].to(dtype)


def _endpoint_form(lo: torch.Tensor, scale: torch.Tensor):
    """(special, sign) from stored (lo, scale) in fp32: is it an endpoint group, and the sign that turns its
    meta, (b, a) or (-b, -a) (module docstring), into (b, a): a = scale * sign, b = lo * sign."""
    special = ~torch.isfinite(lo) | torch.signbit(scale)
    return special, torch.where(lo < scale, -1.0, 1.0)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 codes [rows, k], each < 2**bits -> uint8 [rows, k * bits // 8], code j of a byte at bit j * bits.

    An OR of 8 // bits strided slices: a pointwise op over the bytes. As a sum over a last dimension of
    8 // bits, the same bytes cost 2.7x the time at 1 bit on Inductor's C++ backend, which vectorized each
    byte's 8 codes with a horizontal reduction of its own (bench/bench_kernels.py, 64 MiB, one thread:
    compress 181 -> 67 ms)."""
    if bits == 8:
        return q.to(torch.uint8)
    per = 8 // bits
    q = q.view(q.shape[0], -1, per)
    packed = q[:, :, 0]
    for j in range(1, per):
        packed = packed | (q[:, :, j] << j * bits)
    return packed.to(torch.uint8)


_WORD = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _pack_in_group(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``_pack``'s bytes, as sums over the group: what Inductor's Triton backend computes in the kernel of
    the per-group min/max, so the codes are never written to memory unpacked.

    Why: a Triton kernel covers one iteration space. ``_pack`` is a reduction over 8 // bits codes,
    [ng * G*bits/8] x [8/bits], which cannot share a kernel with the min/max's [ng] x [G], so the codes went
    to memory in fp32 on their way to a pack kernel of their own. Here word w of a group (64 bits, or the
    group's G * bits when that is less) is a sum over the whole group of the codes that fall in it, shifted
    into place: sum_k [k // per == w] * (q_k << bits * (k % per)), per = 64 // bits codes a word. It lives
    in [ng] x [G], as the min/max does, so the scheduler puts both in one kernel, and Inductor writes
    each word straight into its slot of the stacked result. The shifted codes of a word own disjoint bits,
    so the sum is an OR and never carries (the top code sets bit 63 of an int64: still no overflow, since
    no other term has it). Little-endian words viewed as bytes are ``_pack``'s layout. Cost: G * bits / 64
    reductions over the group (4 at 2 bits, G = 128) of register-resident values.
    """
    if bits == 8:
        return q.to(torch.uint8)
    word_bits = min(64, q.shape[1] * bits)
    per = word_bits // bits
    k = torch.arange(q.shape[1], device=q.device)
    shifted = q.to(torch.int64) << ((k % per) * bits)
    words = [torch.where(k // per == w, shifted, 0).sum(1).to(_WORD[word_bits]) for w in range(q.shape[1] // per)]
    return torch.stack(words, 1).view(torch.uint8)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    q = (codes.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(codes.shape[0], -1)


def pack_mask(flat: torch.Tensor) -> torch.Tensor:
    """Bool [n] -> uint8 [ceil(n/8)], element i at bit i % 8 of byte i // 8. Exact."""
    return _pack(_groups(flat.to(torch.int32), 8, 0).view(1, -1), 1).view(-1)


def unpack_mask(packed: torch.Tensor, numel) -> torch.Tensor:
    return _unpack(packed.view(1, -1), 1).reshape(-1)[:numel].to(torch.bool)


# --------------------------------------------------------------------------------------------------
# layout: a dense tensor of any strides is flattened in memory order, and restored with its strides
# --------------------------------------------------------------------------------------------------
def memory_order(shape, strides) -> tuple[int, ...]:
    """Permutation of dims from outermost to innermost in memory; ``shape``/``strides`` are ints."""
    return tuple(sorted(range(len(shape)), key=lambda d: (-strides[d], -shape[d])))


def flatten_in_memory_order(x: torch.Tensor, perm) -> torch.Tensor:
    if list(perm) != sorted(perm):
        x = x.permute(perm)
    return x.reshape(-1)


def restore_layout(flat: torch.Tensor, shape, perm) -> torch.Tensor:
    physical = flat.view([shape[d] for d in perm])
    if list(perm) == sorted(perm):
        return physical
    inverse = [0] * len(perm)
    for i, d in enumerate(perm):
        inverse[d] = i
    return physical.permute(inverse)


# --------------------------------------------------------------------------------------------------
# reference: the same numbers, computed the slow and obvious way (tests only)
# --------------------------------------------------------------------------------------------------
def _scalar_toward_zero(v: float, mdt: torch.dtype) -> float:
    t = torch.tensor([v], dtype=torch.float32)
    if mdt == torch.bfloat16 and math.isfinite(v):
        t = (t.view(torch.int32) & -65536).view(torch.float32)
    return t.item()


def reference_quantize(flat: torch.Tensor, bits: int, group: int, noise: torch.Tensor):
    mdt = meta_dtype(flat.dtype)
    levels = 2**bits - 1
    n = flat.numel()
    ng = num_groups(n, group)
    x = flat.float()
    codes = torch.zeros(ng, group * bits // 8, dtype=torch.uint8)
    meta = torch.zeros(ng, 2, dtype=mdt)
    big = torch.finfo(mdt).max
    for g in range(ng):
        chunk = x[g * group : (g + 1) * group]
        values = [float(v) for v in chunk]
        finite_or_inf = [v for v in values if not math.isnan(v)]
        lo = min(finite_or_inf) if finite_or_inf else math.inf
        hi = math.nan if len(finite_or_inf) < len(values) else max(values)
        lo_s = torch.tensor(lo).to(mdt) if mdt == flat.dtype else (torch.tensor(lo) - abs(lo) * _SAFETY).to(mdt)
        scale = (torch.tensor(hi) - lo_s.float()) / levels * (1 + _SAFETY)
        a, b = _scalar_toward_zero(lo, mdt), _scalar_toward_zero(hi, mdt)
        endpoints = not math.isfinite(lo_s.float()) or not math.isfinite(scale) or scale > big \
            or hi - lo > torch.finfo(flat.dtype).max / 2 or math.isnan(hi)
        if endpoints:  # stored as (b, a), or (-b, -a) when neither b nor a breaks the normal form
            negate = math.copysign(1.0, a) > 0 and math.isfinite(b)
            meta[g, 0], meta[g, 1] = (-b, -a) if negate else (b, a)
        else:
            meta[g, 0], meta[g, 1] = lo_s, min(scale, torch.tensor(big)).to(mdt)
        scale_s = meta[g, 1].float()
        inv = 1.0 / scale_s if scale_s > 0 else torch.tensor(0.0)
        for k in range(group):
            v = values[k] if k < len(values) else 0.0
            if not endpoints:
                q = int(torch.floor((v - lo_s.float()) * inv + noise[g, k]).clamp(0, levels))
            elif math.isfinite(a) and math.isfinite(b):
                p = (v * 0.5 - a * 0.5) / (b * 0.5 - a * 0.5) if b > a else 0.0
                q = levels if math.floor(p + float(noise[g, k])) >= 1 else 0
            else:
                up = v != lo and (v == hi or math.isnan(v) or math.isfinite(hi))
                q = levels if up else 0
            byte, slot = divmod(k * bits, 8)
            codes[g, byte] |= q << slot
    return codes, meta


def reference_dequantize(codes, meta, bits: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    ng, nbytes = codes.shape
    per = 8 // bits
    out = torch.empty(ng * nbytes * per, dtype=torch.float32)
    for g in range(ng):
        lo, scale = meta[g, 0].float(), meta[g, 1].float()
        endpoints = not math.isfinite(lo) or math.copysign(1.0, float(scale)) < 0
        if endpoints and lo < scale:
            lo, scale = -lo, -scale
        for k in range(nbytes * per):
            byte, slot = divmod(k * bits, 8)
            q = (int(codes[g, byte]) >> slot) & (2**bits - 1)
            if endpoints:
                out[g * nbytes * per + k] = scale if q == 0 else lo
            else:
                out[g * nbytes * per + k] = (lo + q * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return out[:numel].to(dtype)
