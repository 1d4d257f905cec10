"""The aten-level quantizer (kernels/quant.py) against its slow reference, and its statistics."""
import pytest
import torch

from actc.kernels import quant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 5, 64, 200])  # 200 is neither a multiple of the group nor of 8
def test_matches_reference_exactly(dtype, bits, numel):
    g = torch.Generator().manual_seed(numel * 10 + bits)
    x = (torch.randn(numel, generator=g) * 3 + 1).to(dtype)
    group = 64
    noise = torch.rand(quant.num_groups(numel, group), group, generator=g)
    codes, meta = quant.quantize(x, bits, group, noise)
    ref_codes, ref_meta = quant.reference_quantize(x, bits, group, noise)
    assert codes.dtype == torch.uint8 and codes.shape == (quant.num_groups(numel, group), group * bits // 8)
    assert meta.dtype == quant.meta_dtype(dtype)
    assert torch.equal(codes, ref_codes) and torch.equal(meta, ref_meta)
    out = quant.dequantize(codes, meta, bits, numel, dtype)
    assert out.dtype == dtype and torch.equal(out, quant.reference_dequantize(codes, meta, bits, numel, dtype))
    # every element within one quantization step of the input, plus the output dtype's own rounding
    step = meta[:, 1].float().repeat_interleave(group)[:numel]
    slack = x.float().abs() * torch.finfo(dtype).eps + 1e-6
    assert ((out.float() - x.float()).abs() <= step * 1.0001 + slack).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group", [8, 16, 128, 1024])  # words of 8, 16, 32 and 64 bits
def test_pack_in_group_is_the_same_bytes(bits, group):
    """The Triton path's pack (sums over the group) against the reference, bit for bit, the top code of an
    int64 word (bit 63) included; compiled by Inductor (C++) too at the default group (seconds a compile)."""
    g = torch.Generator().manual_seed(bits * 1000 + group)
    x = torch.randn(group * 3 + 5, generator=g) * 3
    x[:group] = torch.linspace(-1, 1, group)  # every code, at every position of a word
    noise = torch.rand(quant.num_groups(x.numel(), group), group, generator=g)
    ref_codes, ref_meta = quant.reference_quantize(x, bits, group, noise)
    results = [quant.quantize(x, bits, group, noise, triton=True)]
    if group == quant.DEFAULT_GROUP:
        torch._dynamo.reset()
        results.append(torch.compile(lambda x, n: quant.quantize(x, bits, group, n, triton=True),
                                     backend="inductor")(x, noise))
    for codes, meta in results:
        assert torch.equal(codes, ref_codes) and torch.equal(meta, ref_meta)


def test_meta_bounds_contain_the_group():
    # lo is rounded down and scale up when stored in bf16, so no code ever saturates unfairly
    x = torch.linspace(-1000.123, 1000.456, 1024)
    codes, meta = quant.quantize(x, 2, 128, torch.zeros(8, 128))
    lo, scale = meta[:, 0].float(), meta[:, 1].float()
    groups = x.view(8, 128)
    assert (lo <= groups.min(1).values).all()
    assert (lo + 3 * scale >= groups.max(1).values).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups(dtype):
    torch.manual_seed(0)
    for value in (0.0, 2.5, -7.0):
        x = torch.full((300,), value, dtype=dtype)
        out = quant.dequantize(*quant.quantize(x, 2), 2, 300, dtype)
        if value == 0.0 or dtype != torch.float32:
            assert torch.equal(out, x)  # lo is exact and the scale is 0
        else:
            # fp32 stores lo in bf16, rounded down by |lo| * 2^-7: the error stays inside that margin
            assert ((out - x).abs() <= abs(value) * 2**-6).all()


def test_fp16_extreme_range_does_not_overflow():
    x = torch.tensor([-60000.0, 60000.0] * 64, dtype=torch.float16)
    codes, meta = quant.quantize(x, 1)
    out = quant.dequantize(codes, meta, 1, x.numel(), x.dtype)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unbiased_over_draws(bits):
    torch.manual_seed(0)
    x = torch.randn(4096)
    draws = 400
    total = torch.zeros_like(x)
    for _ in range(draws):
        total += quant.dequantize(*quant.quantize(x, bits), bits, x.numel(), x.dtype)
    mean_err = (total / draws - x).abs().mean()
    one_err = (quant.dequantize(*quant.quantize(x, bits), bits, x.numel(), x.dtype) - x).abs().mean()
    # unbiased: the error of the mean falls like 1/sqrt(draws) = 1/20; allow 1/10 for sampling noise
    assert mean_err < one_err / 10


def test_mask_roundtrip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000):
        m = torch.rand(n, generator=g) > 0.5
        packed = quant.pack_mask(m)
        assert packed.dtype == torch.uint8 and packed.numel() == quant.mask_bytes(n)
        assert torch.equal(quant.unpack_mask(packed, n), m)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(6, 5, 7),                                              # contiguous
    lambda: torch.randn(7, 6).t(),                                             # transposed
    lambda: torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last),     # channels-last
    lambda: torch.randn(1, 9, 1, 3).permute(2, 3, 0, 1),                       # size-1 dims
])
def test_layout_restored_with_strides(make):
    torch.manual_seed(0)
    x = make()
    perm = quant.memory_order(list(x.shape), list(x.stride()))
    flat = quant.flatten_in_memory_order(x, perm)
    assert flat.data_ptr() == x.data_ptr()  # memory order of a dense tensor needs no copy
    y = quant.restore_layout(flat.clone(), list(x.shape), perm)
    assert y.shape == x.shape and y.stride() == x.stride() and torch.equal(y, x)


def test_compressed_bytes_counts_codes_and_meta():
    # 1000 fp32 elements, groups of 128: 8 groups, 2 bits -> 8*32 code bytes + 8*2*2 bf16 meta bytes
    assert quant.compressed_bytes(1000, 2, 128, torch.float32) == 8 * 32 + 8 * 4
    assert quant.compressed_bytes(1000, 8, 128, torch.float16) == 8 * 128 + 8 * 4


def test_bad_format_is_named():
    with pytest.raises(ValueError, match="bits=3"):
        quant.check_format(3, 128)
    with pytest.raises(ValueError, match="group=100"):
        quant.check_format(2, 100)


# --------------------------------------------------------------------------------------------------
# values no step can hold: ±inf, NaN, the dtype's limits (the module docstring's endpoint groups)
# --------------------------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (NaN payload bits are not part of the format)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def _special_groups(dtype: torch.dtype, group: int) -> list[list[float]]:
    fi = torch.finfo(dtype)
    inf, nan = float("inf"), float("nan")
    pairs = [(0.0, -inf), (0.0, inf), (-inf, inf), (1.5, nan), (nan, -inf), (fi.min, 0.0), (0.0, fi.max),
             (fi.min, fi.max), (fi.min, -1.0), (-2.0, fi.max), (-inf, -inf), (nan, nan), (fi.max, fi.max)]
    groups = []
    for a, b in pairs:  # every mix of the two values: alternating, a block of each, one of one
        groups += [[a if k % 2 else b for k in range(group)], [a] * (group // 2) + [b] * (group // 2),
                   [a] + [b] * (group - 1)]
    return groups


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_special_values_round_trip_exactly(dtype, bits):
    """Groups of at most two distinct values come back exactly, whatever they hold: masks of 0 and -inf,
    padding at the dtype's min, NaN, ±inf, the dtype's max. The one exception is fp32's own extremes, beyond
    bf16 meta: finite, same sign, within bf16's rounding (the plan keeps tensors built from them exact)."""
    group = 16
    rows = _special_groups(dtype, group)
    x = torch.tensor(rows, dtype=torch.float32).to(dtype).reshape(-1)
    noise = torch.rand(len(rows), group, generator=torch.Generator().manual_seed(bits))
    codes, meta = quant.quantize(x, bits, group, noise)
    ref_codes, ref_meta = quant.reference_quantize(x, bits, group, noise)
    assert torch.equal(codes, ref_codes) and _same(meta.float(), ref_meta.float())
    out = quant.dequantize(codes, meta, bits, x.numel(), dtype)
    assert _same(out, quant.reference_dequantize(codes, meta, bits, x.numel(), dtype))
    beyond = x.isfinite() & (x.float().abs() > torch.finfo(quant.meta_dtype(dtype)).max)  # fp32 only
    assert _same(out[~beyond], x[~beyond])
    assert torch.isfinite(out[beyond]).all() and torch.equal(out[beyond].sign(), x[beyond].sign())
    assert ((out[beyond] - x[beyond]).abs() <= x[beyond].abs() * 2**-6).all()


def _mixed_groups(dtype: torch.dtype, group: int, count: int, seed: int) -> torch.Tensor:
    """`count` groups, each drawn from a few of: -inf, +inf, NaN, the dtype's min and max, and ordinary values."""
    fi = torch.finfo(dtype)
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([float("-inf"), float("inf"), float("nan"), fi.min, fi.max])
    rows = []
    for _ in range(count):
        kinds = pool[torch.randperm(len(pool), generator=g)[:int(torch.randint(1, 4, (), generator=g))]]
        row = torch.randn(group, generator=g) * 4
        pick = torch.rand(group, generator=g) < 0.5
        row[pick] = kinds[torch.randint(len(kinds), (int(pick.sum()),), generator=g)]
        rows.append(row)
    rows.append(torch.full((group,), float("inf")))  # all +inf: code 0 (a), as the reference stores it
    return torch.stack(rows).to(dtype).reshape(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_mixed_non_finite_groups_match_reference(dtype, bits):
    """Groups that mix ±inf, NaN and the dtype's extremes with several ordinary values (which no format of
    this size holds): the codes and meta are still the reference's, bit for bit, eager (both spellings) and
    compiled (C++), and each group's infinite endpoints come back exactly."""
    group = 16
    x = _mixed_groups(dtype, group, 48, seed=bits)
    noise = torch.rand(x.numel() // group, group, generator=torch.Generator().manual_seed(7))
    ref_codes, ref_meta = quant.reference_quantize(x, bits, group, noise)
    for triton in (False, True):  # both backends' spellings
        codes, meta = quant.quantize(x, bits, group, noise, triton=triton)
        assert torch.equal(codes, ref_codes) and _same(meta.float(), ref_meta.float())
    torch._dynamo.reset()
    got_codes, got_meta = torch.compile(lambda x, n: quant.quantize(x, bits, group, n), backend="inductor",
                                        fullgraph=True)(x, noise)
    assert torch.equal(got_codes, codes) and _same(got_meta.float(), meta.float())
    # a group keeps its two endpoints (least non-NaN value, greatest value or NaN); the infinite ones exactly
    out = quant.dequantize(codes, meta, bits, x.numel(), dtype).view(-1, group)
    xg = x.view(-1, group)
    lo = torch.where(xg.isnan(), float("inf"), xg).amin(1, keepdim=True)
    hi = xg.amax(1, keepdim=True)
    ends = ((xg == lo) | (xg == hi) | (xg.isnan() & hi.isnan())) & ~xg.isfinite()
    assert ends.any() and _same(out[ends], xg[ends])


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflowing_finite_range_stays_unbiased(dtype):
    """A finite group whose range overflows the meta dtype (dtype min and max in one group, other values
    between) is rounded between its endpoints: finite, and unbiased over draws."""
    fi = torch.finfo(dtype)
    a, b = quant._scalar_toward_zero(fi.min, quant.meta_dtype(dtype)), quant._scalar_toward_zero(fi.max, quant.meta_dtype(dtype))
    x = torch.tensor([a, b] + [b * 0.25, a * 0.5, 0.0, b * 0.75] * 3 + [a, b], dtype=torch.float32).to(dtype)
    g = torch.Generator().manual_seed(0)
    draws = 4000
    acc = torch.zeros(x.numel(), dtype=torch.float64)
    for _ in range(draws // 100):
        noise = torch.rand(100, x.numel(), generator=g)
        for i in range(100):
            out = quant.dequantize(*quant.quantize(x, 1, x.numel(), noise[i:i + 1]), 1, x.numel(), dtype)
            assert torch.isfinite(out).all()
            acc += out.double()
    mean = acc / draws
    # each draw is a or b: the mean's standard error is (b - a) / 2 / sqrt(draws); allow 5 of them
    tol = (b - a) / 2 / draws**0.5 * 5
    assert ((mean - x.double()).abs() <= tol).all()


def test_infinite_group_keeps_finite_values_finite():
    """A group with -inf and several finite values cannot be stored by any step: the finite values come back
    as the group's finite endpoint, never as NaN or inf."""
    x = torch.tensor([float("-inf"), 0.25, 0.5, 1.0] * 4)
    out = quant.dequantize(*quant.quantize(x, 2, 16), 2, 16, x.dtype)
    assert torch.equal(out[::4], x[::4])
    assert torch.isfinite(out[x.isfinite()]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_special_values_compiled_match_eager(dtype, bits):
    """The same round trip compiled by Inductor (C++), as the pass inlines it: bit for bit the eager result,
    NaN and inf included (Inductor's reductions must propagate NaN as torch's do)."""
    group = 16
    x = torch.tensor(_special_groups(dtype, group), dtype=torch.float32).to(dtype).reshape(-1)
    noise = torch.rand(x.numel() // group, group, generator=torch.Generator().manual_seed(3))

    def round_trip(x, noise):
        codes, meta = quant.quantize(x, bits, group, noise)
        return quant.dequantize(codes, meta, bits, x.numel(), x.dtype)

    torch._dynamo.reset()
    got = torch.compile(round_trip, backend="inductor", fullgraph=True)(x, noise)
    assert _same(got, round_trip(x, noise))
