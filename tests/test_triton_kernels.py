"""The Triton quantize / dequantize kernels against quant.py, bit for bit, and the eager API on top.

The kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), which is slow: sizes are
a few groups. Triton reads the variable when it is imported (its own tl.sum, tl.rand, ... are jit'd
then), so it is set here before triton is imported, restored right after, and set again around each
test, so other test modules keep the aten path. Where that cannot work in this process -- triton was
already imported by an earlier test module, or a GPU is present and an interpreting Triton would break
the compiled kernels of other tests -- one test runs this file in a fresh process instead, and
test_cuda_matches_aten checks the compiled kernels on the GPU.
"""
import os
import subprocess
import sys

import pytest
import torch

_WAS_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_IN_PROCESS = _WAS_INTERPRETING or ("triton" not in sys.modules and not torch.cuda.is_available())
if _IN_PROCESS and not _WAS_INTERPRETING:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from actc.eager import Compressed, compress, decompress
    from actc.kernels import _triton, quant
    from actc.kernels import triton_dequantize as tdq
    from actc.kernels import triton_quantize as tqz
finally:
    if _IN_PROCESS and not _WAS_INTERPRETING:
        del os.environ["TRITON_INTERPRET"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUTSIDE_INTERPRETER = ("test_in_fresh_process", "test_cuda_matches_aten", "test_cuda_extremes")


@pytest.fixture(autouse=True)
def _interpret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    if request.function.__name__ in _OUTSIDE_INTERPRETER:
        return
    if not _IN_PROCESS:
        pytest.skip("runs in test_in_fresh_process (triton was imported before TRITON_INTERPRET=1)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.slow  # every kernel test again, in Triton's interpreter: minutes
def test_in_fresh_process() -> None:
    if _IN_PROCESS:
        pytest.skip("the interpreter tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def _compare_on_cuda(x: torch.Tensor, bits: int, group: int) -> None:
    noise = torch.rand(quant.num_groups(x.numel(), group), group)
    codes, meta = tqz.triton_quantize(x.cuda(), bits, group, noise.cuda())
    ref_codes, ref_meta = quant.quantize(x, bits, group, noise)
    assert torch.equal(codes.cpu(), ref_codes)
    _assert_same_meta(meta.cpu(), ref_meta)
    out = tdq.triton_dequantize(ref_codes.cuda(), ref_meta.cuda(), bits, x.numel(), x.dtype).cpu()
    ref = quant.dequantize(ref_codes, ref_meta, bits, x.numel(), x.dtype)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available() or _WAS_INTERPRETING,
                                 reason="needs a GPU, and Triton compiling (not interpreting)")


@_NEEDS_CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", quant.BITS)
def test_cuda_matches_aten(bits: int, dtype: torch.dtype) -> None:
    """The compiled kernels (div_rn, no FMA contraction, bf16 rounding) against quant.py on the CPU."""
    n, group = 64 * 1024 + 77, 128
    _compare_on_cuda(_data(n, group, dtype), bits, group)
    _compare_on_cuda(torch.cat(_edge_rows(dtype)[0]).to(dtype), bits, 8)


@_NEEDS_CUDA
@pytest.mark.xfail(strict=False, reason="tl.math.div_rn is reported to lower to div.rn.ftz.f32 on NVIDIA: "
                   "a subnormal 1 / scale flushes to 0 where torch keeps it")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", quant.BITS)
def test_cuda_extremes(bits: int, dtype: torch.dtype) -> None:
    _compare_on_cuda(torch.cat(_edge_rows(dtype)[1]).to(dtype), bits, 8)


def _data(n: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Mixed-sign values over a few magnitudes, one constant group (scale 0), in ``dtype``."""
    x = torch.randn(n) * torch.logspace(-2, 2, n)[torch.randperm(n)] + 0.5
    x[:group] = 1.25
    return x.to(dtype)


def _edge_rows(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Groups of 8 at the edges: (ordinary ones, extreme ones). Ordinary: zeros, constants, subnormal
    inputs, large offsets. Extreme: values near the dtype's max, where the scale nears 2^127 and
    1 / scale is an fp32 subnormal (see test_cuda_extremes).

    Left out: groups whose range is below ~2^-120, where 1 / scale overflows to inf and quant.py's
    (x - lo) * inv is 0 * inf = NaN, cast to int: undefined, and different on GPU."""
    info = torch.finfo(dtype)
    ordinary = [torch.zeros(8), torch.full((8,), -2.7), torch.randn(8) * 1e-3 - 100, torch.rand(8) * 1e4,
                torch.tensor([1e-40, -3e-39, 5e-39, 0.5, -1e-38, 2e-40, 1.0, -7e-40]),  # fp32 subnormals
                torch.tensor([3e-7, -2e-6, 5e-5, 0.5, -1e-5, 2e-7, 1.0, -7e-8])]  # fp16 subnormals
    extreme = [torch.full((8,), info.max), torch.tensor([info.max, -info.max] * 4),
               (torch.rand(8) - 0.5) * info.max]
    return ordinary, extreme


def _assert_same_meta(meta: torch.Tensor, expected: torch.Tensor) -> None:
    # Compared by value: a zero lo may carry either sign (torch's amin keeps whichever zero its reduction
    # order meets first); codes and dequantized values never depend on it. NaN-free data, so equal
    # values are equal bits otherwise.
    assert meta.dtype == expected.dtype and meta.shape == expected.shape
    assert torch.equal(meta.float(), expected.float())


# ------------------------------------------------------------------------------------------------
# bit-exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [8, 128, 1024])
@pytest.mark.parametrize("tail", [False, True], ids=["multiple", "tail"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", quant.BITS)
def test_quantize_matches_reference(bits: int, dtype: torch.dtype, tail: bool, group: int) -> None:
    n = group + group // 2 + 3 if tail else 2 * group
    x = _data(n, group, dtype)
    noise = torch.rand(quant.num_groups(n, group), group)
    codes, meta = tqz.triton_quantize(x, bits, group, noise)
    for ref_codes, ref_meta in (quant.quantize(x, bits, group, noise),
                                quant.reference_quantize(x, bits, group, noise)):
        assert torch.equal(codes, ref_codes)
        _assert_same_meta(meta, ref_meta)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf arithmetic
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", quant.BITS)
def test_quantize_edge_values(bits: int, dtype: torch.dtype) -> None:
    """Extremes of the dtype, subnormals, zeros and constants, group by group (8 elements each)."""
    ordinary, extreme = _edge_rows(dtype)
    x = torch.cat(ordinary + extreme).to(dtype)
    noise = torch.rand(x.numel() // 8, 8)
    codes, meta = tqz.triton_quantize(x, bits, 8, noise)
    ref_codes, ref_meta = quant.quantize(x, bits, 8, noise)
    assert torch.equal(codes, ref_codes)
    _assert_same_meta(meta, ref_meta)
    out = tdq.triton_dequantize(ref_codes, ref_meta, bits, x.numel(), dtype)
    ref = quant.dequantize(ref_codes, ref_meta, bits, x.numel(), dtype)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", quant.BITS)
def test_dequantize_exact(bits: int, dtype: torch.dtype) -> None:
    n, group = 3 * 128 + 17, 128
    codes, meta = quant.quantize(_data(n, group, dtype), bits, group, torch.rand(4, group))
    out = tdq.triton_dequantize(codes, meta, bits, n, dtype)
    for ref in (quant.dequantize(codes, meta, bits, n, dtype),
                quant.reference_dequantize(codes, meta, bits, n, dtype)):
        assert out.dtype == dtype and out.shape == (n,)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))  # bits, not values


# ------------------------------------------------------------------------------------------------
# the in-kernel Philox noise
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", quant.BITS)
def test_philox_noise_is_unbiased(bits: int) -> None:
    """With the kernel's own noise, the mean of many dequantized draws converges to the input."""
    # One launch holds all draws: the same 512 values repeated, each copy at other offsets, so other noise.
    n, group = 512, 128
    x = torch.randn(n)
    for draws in (16, 256):
        codes, meta = tqz.triton_quantize(x.repeat(draws), bits, group, seed=1234)
        y = tdq.triton_dequantize(codes, meta, bits, n * draws, torch.float32).view(draws, n)
        scale = meta[:, 1].float().view(draws, -1)[0].repeat_interleave(group)  # same groups each copy
        err = (y.mean(0) - x) / scale  # error of the mean, in quantization steps
        # One draw's error is a Bernoulli over one step: std <= 1/2 step, so the mean of `draws` draws has
        # std <= 1 / (2 sqrt(draws)). 5 of those bounds the largest of 512 (p of a miss < 1e-3 each);
        # the overall mean averages 512 * draws draws: 5 / (2 sqrt(512 draws)).
        assert err.abs().max() < 5 / (2 * draws**0.5)
        assert err.mean().abs() < 5 / (2 * (n * draws) ** 0.5)
        if draws == 16:
            err16 = err.abs().mean()
    # sqrt(256 / 16) = 4 times smaller in expectation; a factor 2 leaves room for sampling noise
    assert err.abs().mean() < err16 / 2


def test_seed_reproducible() -> None:
    x = torch.randn(1000)
    first = tqz.triton_quantize(x, 2, 128, seed=7)
    again = tqz.triton_quantize(x, 2, 128, seed=7)
    other = tqz.triton_quantize(x, 2, 128, seed=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(3)
    a = tqz.triton_quantize(x, 2, 128)  # seed drawn from torch's generator
    torch.manual_seed(3)
    assert torch.equal(a[0], tqz.triton_quantize(x, 2, 128)[0])


# ------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton", "aten"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(interpret: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema, fake implementation and AOT dispatch of both custom ops, on either implementation: given
    noise and given a seed, a tail group, the smallest and the largest group."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for n, bits, group in ((300, 4, 128), (77, 1, 8), (1500, 2, 1024)):
        x = torch.randn(n).to(dtype)
        noise = torch.rand(quant.num_groups(n, group), group)
        torch.library.opcheck(torch.ops.actc.quantize.default, (x, bits, group, noise, None))
        torch.library.opcheck(torch.ops.actc.quantize.default, (x, bits, group, None, 5))
        codes, meta = torch.ops.actc.quantize(x, bits, group, noise, None)
        torch.library.opcheck(torch.ops.actc.dequantize.default, (codes, meta, bits, n, dtype))


def test_ops_use_triton_and_aten_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(300, dtype=torch.bfloat16)
    noise = torch.rand(3, 128)
    codes, meta = torch.ops.actc.quantize(x, 2, 128, noise, None)  # Triton (interpreter)
    out = torch.ops.actc.dequantize(codes, meta, 2, 300, torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _triton.use_triton(x)
    aten_codes, aten_meta = torch.ops.actc.quantize(x, 2, 128, noise, None)
    assert torch.equal(codes, aten_codes)
    _assert_same_meta(meta, aten_meta)
    assert torch.equal(out, torch.ops.actc.dequantize(codes, meta, 2, 300, torch.bfloat16))


def test_int64_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real tensor past 2^31 elements is out of reach here (8 GiB, and hours in the interpreter), so
    the offset arithmetic is checked at small size: the interpreter is made to run program 2^20 instead
    of program 0. A program covers 4096 elements, so its first element is 2^32, which an int32 offset
    would wrap to 0, reading x and writing out inside the real (small) buffers. With int64 offsets every
    access lies 2^32 elements on and is masked off, and the buffers stay as they were."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interpreter, "interpreter_builder", None)
    hooks = ("set_grid_dim", "set_grid_idx", "create_masked_load", "create_masked_store")
    if builder is None or not all(hasattr(builder, h) for h in hooks):
        pytest.skip("this Triton's interpreter has no interpreter_builder hooks to shift program ids")
    shift = 2**20
    assert shift * _triton.BLOCK_ELEMENTS % 2**32 == 0
    set_grid_dim, set_grid_idx, load, store = (getattr(builder, h) for h in hooks)
    loads: list = []  # the address arrays of every load / store, in program order
    stores: list = []
    monkeypatch.setattr(builder, "set_grid_dim", lambda x, y, z: set_grid_dim(x + shift, y, z))
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_grid_idx(x + shift, y, z))
    monkeypatch.setattr(builder, "create_masked_load",
                        lambda p, *a: loads.append(p.data.copy()) or load(p, *a))
    monkeypatch.setattr(builder, "create_masked_store",
                        lambda p, *a: stores.append(p.data.copy()) or store(p, *a))

    x, noise = torch.randn(4096), torch.rand(32, 128)
    codes = torch.full((32, 32), 0xAB, dtype=torch.uint8)
    meta = torch.zeros(32, 2, dtype=torch.bfloat16)
    out = torch.full((4096,), -1.0)
    tqz.launch_quantize(x, 2, 128, noise, 0, codes, meta)
    assert int(loads[0].min()) == x.data_ptr() + 4 * 2**32  # the kernel's first load is x
    tdq.launch_dequantize(codes, meta, 2, out)
    assert int(stores[-1].min()) == out.data_ptr() + 4 * 2**32  # its last store is out
    assert (codes == 0xAB).all() and (meta == 0).all() and (out == -1).all()
    addresses = [int(a) for arr in loads + stores for a in arr.ravel()]
    for t in (x, noise, codes, meta, out):  # nothing wrapped back into a real buffer
        start = t.data_ptr()
        assert not any(start <= a < start + t.numel() * t.element_size() for a in addresses)


# ------------------------------------------------------------------------------------------------
# eager API
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: torch.randn(40, 24).t(),
    lambda: torch.randn(2, 3, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last),
    lambda: torch.randn(5, 7, 3, dtype=torch.float16).permute(2, 0, 1),
], ids=["transposed", "channels_last", "permuted_fp16"])
def test_eager_round_trip_restores_layout(make) -> None:
    t = make()
    c = compress(t, bits=8, group=8)
    y = decompress(c)
    assert y.shape == t.shape and y.dtype == t.dtype and y.stride() == t.stride()
    assert c.nbytes == quant.compressed_bytes(t.numel(), 8, 8, t.dtype)
    # bits=8: each value within one step (range / 255, rounded up) of its group, plus the output rounding
    step = (t.float().max() - t.float().min()) / 255 * 1.02
    assert ((y.float() - t.float()).abs() <= step + t.float().abs() * 2**-7).all()
    flat = quant.flatten_in_memory_order(t, c.perm)  # given the noise, exactly quant.py's numbers
    noise = torch.rand(quant.num_groups(t.numel(), 8), 8)
    y = decompress(compress(t, bits=2, group=8, noise=noise))
    codes, meta = quant.quantize(flat, 2, 8, noise)
    expected = quant.dequantize(codes, meta, 2, t.numel(), t.dtype)
    assert torch.equal(quant.flatten_in_memory_order(y, c.perm), expected)


def test_eager_non_dense_scalar_and_empty() -> None:
    t = torch.randn(6, 10)[:, ::2]
    assert decompress(compress(t)).shape == t.shape
    for t in (torch.tensor(3.5), torch.empty(0, 4)):
        y = decompress(compress(t, bits=8, group=8))
        assert y.shape == t.shape and y.dtype == t.dtype


def test_mask_exact() -> None:
    t = (torch.randn(13, 21) > 0).t()
    c = compress(t)
    y = decompress(c)
    assert c.is_mask and isinstance(c, Compressed) and c.nbytes == quant.mask_bytes(t.numel())
    assert y.dtype == torch.bool and y.stride() == t.stride() and torch.equal(y, t)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), r"bits=3 .*valid: \(1, 2, 4, 8\)"),
    (dict(group=100), r"group=100 .*power of two from 8 to 1024"),
    (dict(group=2048), r"group=2048"),
    (dict(noise=torch.zeros(2, 2)), r"noise must be float32 of shape \(1, 128\)"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compress(torch.randn(100), **kwargs)


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match=r"dtype=torch.int32 is not supported; valid"):
        compress(torch.ones(10, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"flat must be a 1-D tensor"):
        tqz.triton_quantize(torch.ones(10, dtype=torch.float64), 2, 8)
    with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
        compress([1.0, 2.0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf arithmetic
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", quant.BITS)
def test_special_values_match_aten(bits: int, dtype: torch.dtype) -> None:
    """±inf, NaN and the dtype's limits (quant.py's endpoint groups): the kernels store and restore them as
    the aten code does, NaN where NaN (NaN payload bits are not part of the format)."""
    from test_quant import _same, _special_groups

    x = torch.tensor(_special_groups(dtype, 8), dtype=torch.float32).to(dtype).reshape(-1)
    noise = torch.rand(x.numel() // 8, 8, generator=torch.Generator().manual_seed(bits))
    codes, meta = tqz.triton_quantize(x, bits, 8, noise)
    ref_codes, ref_meta = quant.quantize(x, bits, 8, noise)
    assert torch.equal(codes, ref_codes) and _same(meta.float(), ref_meta.float())
    out = tdq.triton_dequantize(ref_codes, ref_meta, bits, x.numel(), dtype)
    assert _same(out.float(), quant.dequantize(ref_codes, ref_meta, bits, x.numel(), dtype).float())
