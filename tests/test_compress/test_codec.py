"""The codec: kernels against the reference bit for bit, error bound, unbiasedness, bad input."""
import warnings
from types import SimpleNamespace

import pytest
import torch

from actnn_mm.compress import (CompressedTensor, dequantize, extension_loaded, ops, quantize,
                               reference)
from actnn_mm.compress.codec import not_finite, raise_if_not_finite, samples_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The kernels' backends: each is held to the reference (and CUDA to the CPU) bit for bit.
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _shapes():
    """(name, tensor factory) pairs covering the odd sizes and layouts the codec must take."""
    def randn(*shape):
        return torch.randn(*shape) * 3 + 1

    return {
        'groups_not_multiple': lambda: randn(4, 1000),
        'single_element': lambda: randn(1),
        'scalar': lambda: torch.tensor(2.5),
        'empty_batch': lambda: randn(0, 3, 5),
        'empty_sample': lambda: randn(3, 0),
        'odd_4d': lambda: randn(2, 3, 17, 19),
        'constant_groups': lambda: torch.full((2, 600), 0.3),
        'channels_last': lambda: randn(2, 8, 5, 7).to(memory_format=torch.channels_last),
        'channels_last_3d': lambda: randn(2, 4, 3, 5, 6).to(memory_format=torch.channels_last_3d),
        'transposed': lambda: randn(9, 40).t(),
        'strided_slice': lambda: randn(6, 64, 9)[::2, 5:50, ::3],
        'large_dynamic_range': lambda: randn(2, 512) * torch.logspace(-3, 3, 512),
        # narrow groups inside a wide sample: codes far from the grid's ends
        'narrow_groups': lambda: randn(3, 640) * torch.logspace(-4, 0, 10).repeat_interleave(64),
        'relu': lambda: randn(3, 500).clamp(min=0),  # groups of zeros on the grid's min
        'constant_samples': lambda: torch.tensor([[0.3] * 70, [-2.0**-20] * 70, [6e4] * 70]),
        'subnormal_range': lambda: torch.randn(2, 300) * 1e-40,  # grid steps below float32's
    }


SHAPES = _shapes()
MIXED = 'mixed'


def _bits_for(x: torch.Tensor, bits):
    if bits != MIXED:
        return bits
    n = x.shape[0] if x.dim() else 1
    return torch.tensor([1, 2, 4, 8])[torch.arange(n) % 4]


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('shape', list(SHAPES))
@pytest.mark.parametrize('bits', [1, 2, 4, 8, MIXED])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('stochastic', [True, False])
@pytest.mark.parametrize('device', DEVICES)
def test_kernels_match_reference_bit_for_bit(shape, bits, dtype, stochastic, device):
    x = SHAPES[shape]().to(dtype)
    c = quantize(x.to(device), _bits_for(x, bits), group_size=64, seed=12345,
                 stochastic=stochastic).to('cpu')
    samples, _ = samples_view(x)
    data, meta, sample_meta = reference.quantize(samples, c.bits, c.offsets, 64, 12345,
                                                 stochastic, c.data.numel())
    assert torch.equal(c.data, data)
    assert c.meta.dtype == meta.dtype == torch.uint8 and torch.equal(c.meta, meta)
    assert c.sample_meta.dtype == torch.float32
    # bit for bit (-0 and +0 differ; NaN equals NaN)
    assert torch.equal(c.sample_meta.view(torch.int32), sample_meta.view(torch.int32))
    expected = reference.dequantize(data, meta, sample_meta, c.bits, c.offsets, samples.shape[0],
                                    samples.shape[1], 64, dtype)
    assert torch.equal(samples_view(dequantize(c.to(device)).cpu())[0], expected)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_quantize_takes_a_buffer_with_slack(device):
    # a buffer sized from a bit budget: bytes after the last sample's stream (and between
    # streams) are zero, and dequantize reads only the streams
    x = torch.randn(3, 100, device=device)
    bits = torch.tensor([1, 2, 4], dtype=torch.uint8, device=device)
    offsets = torch.tensor([0, 13, 40, 90], device=device)  # 2 bytes of slack after sample 1
    data, meta, sample_meta = torch.ops.actnn_mm.quantize(x, bits, offsets, 64, 3, True, 120)
    want = reference.quantize(x.cpu(), bits.cpu(), offsets.cpu(), 64, 3, True, 120)
    assert data.shape == (120,) and torch.equal(data.cpu(), want[0])
    assert torch.equal(meta.cpu(), want[1]) and torch.equal(sample_meta.cpu(), want[2])
    assert not data[38:40].any() and not data[90:].any()
    y = torch.ops.actnn_mm.dequantize(data, meta, sample_meta, bits, offsets, 3, 100, 64,
                                      torch.float32)
    assert torch.equal(y.cpu(), reference.dequantize(*want, bits.cpu(), offsets.cpu(), 3, 100,
                                                     64, torch.float32))


@pytest.mark.parametrize('shape', list(SHAPES))
@pytest.mark.parametrize('dtype', DTYPES)
def test_round_trip_keeps_shape_dtype_layout(shape, dtype):
    x = SHAPES[shape]().to(dtype)
    y = dequantize(quantize(x, 8, group_size=64))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    # Dense sample-major layouts come back as they went in; any other layout comes back contiguous.
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if layout is not None and x.is_contiguous(memory_format=layout):
        assert y.is_contiguous(memory_format=layout)
    else:
        assert y.is_contiguous()


def _group_scale(c: CompressedTensor, x: torch.Tensor) -> torch.Tensor:
    """The scale of each element's group, in the (N, M) memory-order view."""
    samples, _ = samples_view(x)
    n, m = samples.shape
    _, scale = reference.stored_params(c.meta, c.sample_meta, c.bits, n)
    return scale.repeat_interleave(c.group_size, dim=1)[:, :m]


@pytest.mark.parametrize('shape', ['groups_not_multiple', 'odd_4d', 'channels_last',
                                   'large_dynamic_range', 'narrow_groups', 'relu',
                                   'constant_groups', 'constant_samples', 'subnormal_range'])
@pytest.mark.parametrize('bits', [1, 2, 4, 8, MIXED])
def test_error_at_most_one_step(shape, bits):
    x = SHAPES[shape]()
    c = quantize(x, _bits_for(x, bits), group_size=64)
    err = (samples_view(dequantize(c))[0] - samples_view(x)[0]).abs()
    assert bool((err <= _group_scale(c, x)).all())


def test_round_to_nearest_error_at_most_half_step():
    x = torch.randn(4, 1000)
    c = quantize(x, 2, group_size=64, stochastic=False)
    err = (dequantize(c) - x).abs()
    assert bool((err <= _group_scale(c, x) / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize('bits', [1, 2, 4])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_unbiased_error_shrinks_like_inverse_sqrt(bits, dtype):
    torch.manual_seed(0)
    x = (torch.randn(8, 512) * torch.rand(8, 1) * 4).to(dtype)
    copies = torch.stack([dequantize(quantize(x, bits)).float() for _ in range(1024)])
    err_16 = (copies[:16].mean(0) - x.float()).abs().mean()
    err_1024 = (copies.mean(0) - x.float()).abs().mean()
    # sqrt(1024 / 16) = 8: allow some slack for noise, none for a bias (which would not shrink).
    assert err_1024 < err_16 / 5
    single = (copies[0] - x.float()).abs().mean()
    assert err_1024 < single / 20


@pytest.mark.parametrize('bits', [1, 2, 4])
def test_unbiased_in_every_group_of_a_wide_sample(bits):
    # groups whose ranges span 5 decades in one sample: each group's own values, codes far from
    # the grid's ends, are unbiased (a level is within half a step of its mean with std at most
    # scale / 2, so the mean of K copies is within 6 scale / (2 sqrt K) but for a bias)
    torch.manual_seed(1)
    x = torch.randn(4, 16 * 256) * torch.logspace(-5, 0, 16).repeat_interleave(256) + 3e-5
    k = 512
    c = quantize(x, bits)
    scale = _group_scale(c, x)
    mean = torch.stack([dequantize(quantize(x, bits)) for _ in range(k)]).double().mean(0)
    err = (mean - x.double()).abs()
    assert bool((err <= 6 * scale / (2 * k**0.5) + 1e-6 * x.abs()).all()), float(
        (err / scale).max())


@pytest.mark.parametrize('seed', [0, 1, -7, 2**40 + 3])
def test_rounding_noise_is_uniform_and_uncorrelated(seed):
    # u for 2^20 consecutive elements, across the 2^32 boundary where the index's high half (the
    # salt) changes; the kernels draw the same u bit for bit
    index = torch.arange(2**20, dtype=torch.int64) + (2**32 - 2**19)
    u = reference.uniform(reference.rng_key(seed), index).double()
    sigma = 2.0**-10  # of a mean of 2^20 products of independent standardized values
    assert abs(float(u.mean()) - 0.5) < 5 * sigma * 12**-0.5
    assert abs(float(u.var()) * 12 - 1) < 0.01
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert float(((counts - 2**16) ** 2 / 2**16).sum()) < 50  # chi-square, 15 dof: p < 1e-5
    z = (u - 0.5) * 12**0.5
    for lag in (1, 2, 3, 4, 8, 16, 256):
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 5 * sigma, lag


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('bits', [1, 2, 8, MIXED])
def test_constant_samples_are_exact(dtype, bits):
    # any finite value: the sample's min is stored in float32 and its range is 0
    info = torch.finfo(dtype)
    values = torch.tensor([0.3, -1.7e-5, info.tiny, info.max, -info.max, -0.0, 123.456]).to(dtype)
    x = values[:, None].expand(7, 700).contiguous()
    c = quantize(x, _bits_for(x, bits))
    assert torch.equal(c.sample_meta[:, 1], torch.zeros(7))
    assert torch.equal(dequantize(c), x)


def test_constant_groups_on_the_grid_are_exact():
    # ReLU's zeros in a sample whose min is 0: the group's min code is 0 and its levels 0
    x = torch.randn(4, 1024).clamp(min=0)
    x[:, 256:512] = 0
    y = dequantize(quantize(x, 2))
    assert torch.equal(y[:, 256:512], x[:, 256:512])


def test_constant_group_unbiased_when_not_on_the_grid():
    x = torch.cat([torch.linspace(0, 1, 256), torch.full((256,), 0.3)])[None]  # grid step 1/255
    c = quantize(x, 2)
    assert c.meta[1, 0] == 76  # 0.3 is 76.5 steps above the min
    torch.manual_seed(0)
    copies = torch.stack([dequantize(quantize(x, 2)) for _ in range(256)])
    assert not torch.equal(copies[0, 0, 256:], x[0, 256:])
    # levels 7e-4 apart: the mean of 65536 values has a standard deviation below 1.4e-6
    assert abs(float(copies[:, 0, 256:].double().mean()) - 0.3) < 1e-5


@pytest.mark.parametrize('bits', [1, 2, 4, 8, MIXED])
def test_nbytes_is_what_is_held(bits):
    x = torch.randn(6, 3, 33, 31)  # 3069 values per sample: not a multiple of 8 or of the group
    c = quantize(x, _bits_for(x, bits))
    widths = c.bits.long()
    groups = 6 * -(-3069 // 256)
    packed = int(((3069 * widths + 7) // 8).sum())
    assert c.data.numel() == packed
    assert c.nbytes == packed + 2 * groups + 17 * 6 + 8
    assert c.statistics_nbytes == 2 * groups + 8 * 6
    if bits != MIXED:  # within one byte per sample of the ideal stream
        assert packed - (x.numel() * bits + 7) // 8 < 6


def test_compression_ratio_at_two_bits():
    x = torch.randn(16, 64, 28, 28)
    c = quantize(x, 2)
    ratio = x.numel() * 4 / c.nbytes
    assert ratio > 15.4  # 32 / (2 + 16/256) = 15.52 in the limit


def test_seed_reproducible_and_none_follows_manual_seed():
    x = torch.randn(4, 700)
    assert torch.equal(quantize(x, 2, seed=7).data, quantize(x, 2, seed=7).data)
    assert not torch.equal(quantize(x, 2, seed=7).data, quantize(x, 2, seed=8).data)
    torch.manual_seed(3)
    a = quantize(x, 2).data
    torch.manual_seed(3)
    assert torch.equal(a, quantize(x, 2).data)
    assert not torch.equal(a, quantize(x, 2).data)


def test_seed_accepts_any_python_int():
    x = torch.randn(2, 100)
    assert torch.equal(quantize(x, 2, seed=-1).data, quantize(x, 2, seed=2**64 - 1).data)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
@pytest.mark.parametrize('dtype', DTYPES)
def test_nan_inf_raise(bad, dtype):
    x = torch.randn(3, 500)
    x[2, 321] = bad
    with pytest.raises(ValueError, match=r'NaN or Inf.*1 of 3 samples, the first in sample 2'):
        quantize(x.to(dtype), 2)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_samples_are_flagged_in_sample_meta(bad, monkeypatch):
    from actnn_mm.compress import codec
    monkeypatch.setattr(codec, '_CHECKED_AT_ONCE', ())  # defer as on an accelerator
    x = torch.randn(4, 300)
    x[1, 7] = bad
    x[3, 299] = -bad
    c = quantize(x, 2, defer_check=True)
    assert torch.isnan(c.sample_meta).all(dim=1).tolist() == [False, True, False, True]
    assert bool(not_finite(c))
    assert not bool(not_finite(quantize(x[::2], 2)))
    with pytest.raises(ValueError, match=r'2 of 4 samples, the first in sample 1'):
        raise_if_not_finite(c)


def test_range_beyond_float32_raises():
    x = torch.tensor([[0.0, 1.0], [-3.4e38, 3.4e38]])  # both finite, their difference is not
    with pytest.raises(ValueError, match=r'range beyond float32\) in 1 of 2 samples, the first '
                                         r'in sample 1'):
        quantize(x, 2)


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
def test_large_finite_values_pass(bits):
    # range 3.4e38, just below float32's largest, and magnitudes beyond bfloat16's
    x = torch.tensor([[-1.7e38, 1.7e38, -1.5e38, 3e37], [3.4e38, 3.39e38, 3.4e38, 3.395e38]])
    c = quantize(x, bits)
    y = dequantize(c)
    assert torch.isfinite(c.sample_meta).all() and torch.isfinite(y).all()
    assert bool(((y - x).abs() <= _group_scale(c, x)).all())


@pytest.mark.parametrize('dtype', [torch.float64, torch.int32, torch.uint8, torch.bool])
def test_wrong_dtype_raises(dtype):
    with pytest.raises(TypeError, match='float32, float16 or bfloat16'):
        quantize(torch.zeros(2, 3, dtype=dtype), 2)


def test_not_a_tensor_raises():
    with pytest.raises(TypeError):
        quantize([1.0, 2.0], 2)


@pytest.mark.parametrize('bits', [0, 3, 16, 32, 2.0, True, 'L3', None])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match='bits'):
        quantize(torch.randn(2, 8), bits)


@pytest.mark.parametrize('bits', [torch.tensor([2, 3]), torch.tensor([2]), torch.tensor([[2, 2]]),
                                  torch.tensor([2.0, 2.0])])
def test_bad_per_sample_bits_raise(bits):
    with pytest.raises(ValueError, match='bit'):
        quantize(torch.randn(2, 8), bits)


@pytest.mark.parametrize('group_size', [0, -8, 12, 7.5, True])
def test_bad_group_size_raises(group_size):
    with pytest.raises(ValueError, match='group_size'):
        quantize(torch.randn(2, 8), 2, group_size=group_size)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
def test_ops_check_their_arguments():
    x = torch.randn(2, 16)
    bits = torch.tensor([2, 3], dtype=torch.uint8)
    offsets = torch.tensor([0, 4, 8])
    with pytest.raises(RuntimeError, match='bit width 3'):
        torch.ops.actnn_mm.quantize(x, bits, offsets, 8, 0, True, 8)
    bits = torch.tensor([2, 2], dtype=torch.uint8)
    with pytest.raises(RuntimeError, match='too little room'):
        torch.ops.actnn_mm.quantize(x, bits, torch.tensor([0, 3, 8]), 8, 0, True, 8)
    with pytest.raises(RuntimeError, match='past the data'):
        torch.ops.actnn_mm.quantize(x, bits, offsets, 8, 0, True, 7)
    with pytest.raises(RuntimeError, match='multiple of 8'):
        torch.ops.actnn_mm.quantize(x, bits, offsets, 12, 0, True, 8)
    with pytest.raises(RuntimeError, match='float32, float16 or bfloat16'):
        torch.ops.actnn_mm.quantize(x.double(), bits, offsets, 8, 0, True, 8)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('device', DEVICES)
def test_opcheck(dtype, device):
    x = torch.randn(3, 100).to(dtype).to(device)
    c = quantize(x, torch.tensor([1, 2, 8]), group_size=32, seed=5)
    torch.library.opcheck(torch.ops.actnn_mm.quantize,
                          (x, c.bits, c.offsets, 32, 5, True, c.data.numel()))
    torch.library.opcheck(torch.ops.actnn_mm.dequantize,
                          (c.data, c.meta, c.sample_meta, c.bits, c.offsets, 3, 100, 32, dtype))
    torch.library.opcheck(torch.ops.actnn_mm.dequantize_transposed,
                          (c.data, c.meta, c.sample_meta, c.bits, c.offsets, 3, 4, 25, 32, dtype))


def test_reference_fallback_warns_once_and_matches(monkeypatch):
    x = torch.randn(3, 200)
    expected = quantize(x, 2, seed=9)
    monkeypatch.setattr(ops, '_C', None)
    monkeypatch.setattr(ops, '_IMPORT_ERROR', ImportError('not built'), raising=False)
    monkeypatch.setattr(ops, '_warned', False)
    with pytest.warns(UserWarning, match='pure-PyTorch codec'):
        got = quantize(x, 2, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = dequantize(got)
    assert torch.equal(got.data, expected.data)
    assert torch.equal(y, dequantize(expected))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
def test_devices_without_kernels_use_the_reference(monkeypatch):
    x = torch.randn(3, 200)
    expected = quantize(x, 2, seed=9)
    # act as if the CPU were a device the extension has no kernels for (mps, xpu, ...)
    monkeypatch.setattr(ops, '_KERNEL_DEVICE_TYPES', ('cuda',))
    monkeypatch.setattr(ops, '_warned', False)
    with pytest.warns(UserWarning, match='codec on cpu: the extension has kernels for cuda only'):
        got = quantize(x, 2, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # one warning only
        y = dequantize(got)
        sums = ops.batch_norm_sums(x, x)
    assert torch.equal(got.data, expected.data) and torch.equal(y, dequantize(expected))
    assert torch.equal(sums, reference.batch_norm_sums(x, x))
    for device_type in ('mps', 'xpu', 'hpu', 'privateuseone'):
        assert not ops._extension_serves(SimpleNamespace(device=torch.device(device_type)))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
def test_tensors_without_values_use_the_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        x = torch.empty(4, 300, dtype=torch.bfloat16)
        bits = torch.full((4,), 2, dtype=torch.uint8)
        offsets = torch.arange(5) * 75
        data, meta, sample_meta = ops.quantize(x, bits, offsets, 64, 1, True, 320)
        y = ops.dequantize(data, meta, sample_meta, bits, offsets, 4, 300, 64, torch.bfloat16)
        return data, meta, sample_meta, y

    with torch.device('meta'):
        data, meta, sample_meta, y = run()
    assert data.device.type == 'meta' and data.shape == (320,) and y.shape == (4, 300)
    with FakeTensorMode():  # the ops themselves trace
        data, meta, sample_meta, y = run()
    assert data.dtype == torch.uint8 and data.shape == (320,)
    assert meta.shape == (4 * 5, 2) and meta.dtype == torch.uint8
    assert sample_meta.shape == (4, 2) and sample_meta.dtype == torch.float32
    assert y.shape == (4, 300) and y.dtype == torch.bfloat16
    # fake CUDA tensors need no GPU, nor a CUDA build; the reference would read their values
    with warnings.catch_warnings(), FakeTensorMode(), torch.device('cuda'):
        warnings.simplefilter('error')
        data, meta, sample_meta, y = run()
    assert data.device.type == 'cuda' and meta.shape == (20, 2) and y.dtype == torch.bfloat16
    assert sample_meta.device.type == 'cuda' and sample_meta.shape == (4, 2)


def test_to_same_device_is_free():
    c = quantize(torch.randn(2, 300), 4)
    assert c.to('cpu') is c


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('bits', [1, 2, 4, 8, MIXED])
@pytest.mark.parametrize('dtype', DTYPES)
def test_cuda_matches_cpu_bit_for_bit(bits, dtype):
    x = (torch.randn(5, 3, 37, 41) * 2).to(dtype)
    widths = _bits_for(x, bits)
    cpu = quantize(x, widths, seed=77)
    gpu = quantize(x.cuda(), widths, seed=77)
    assert torch.equal(cpu.data, gpu.data.cpu())
    assert torch.equal(cpu.meta, gpu.meta.cpu())
    assert torch.equal(cpu.sample_meta.view(torch.int32), gpu.sample_meta.cpu().view(torch.int32))
    assert torch.equal(dequantize(cpu), dequantize(gpu).cpu())
    assert torch.equal(dequantize(cpu.to('cuda')).cpu(), dequantize(cpu))
    layout = torch.channels_last
    assert torch.equal(dequantize(cpu, layout), dequantize(gpu, layout).cpu())
    pinned = gpu.to('cpu').pin_memory()
    assert pinned.data.is_pinned() and torch.equal(dequantize(pinned), dequantize(cpu))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('bits', [1, 2, 4, 8])
@pytest.mark.parametrize('numel', [0, 1, 7, 8, 9, 1000, 4097])
@pytest.mark.parametrize('device', DEVICES)
def test_pack_bits_matches_reference(bits, numel, device):
    g = torch.Generator().manual_seed(numel)
    values = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = torch.ops.actnn_mm.pack_bits(values.to(device), bits)
    assert torch.equal(packed.cpu(), reference.pack_bits(values, bits))
    assert packed.numel() == -(-numel * bits // 8)
    assert torch.equal(torch.ops.actnn_mm.unpack_bits(packed, bits, numel).cpu(), values)
    assert torch.equal(reference.unpack_bits(packed.cpu(), bits, numel), values)
    if bits == 1:
        mask = values.bool().to(device)
        assert torch.equal(torch.ops.actnn_mm.pack_bits(mask, 1), packed)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_pack_bits_checks_and_opcheck(device):
    with pytest.raises(RuntimeError, match='1, 2, 4 or 8 bits'):
        torch.ops.actnn_mm.pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(RuntimeError, match='contiguous uint8 or bool'):
        torch.ops.actnn_mm.pack_bits(torch.zeros(4), 1)
    with pytest.raises(RuntimeError, match='holding 100 values'):
        torch.ops.actnn_mm.unpack_bits(torch.zeros(4, dtype=torch.uint8), 2, 100)
    values = torch.randint(0, 16, (37,), dtype=torch.uint8, device=device)
    torch.library.opcheck(torch.ops.actnn_mm.pack_bits, (values, 4))
    torch.library.opcheck(torch.ops.actnn_mm.unpack_bits, (reference.pack_bits(values, 4), 4, 37))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('bits', [1, 2, 4, 8])
def test_pack_bits_cuda_matches_cpu(bits):
    values = torch.randint(0, 2**bits, (1234,), dtype=torch.uint8)
    packed = torch.ops.actnn_mm.pack_bits(values.cuda(), bits)
    assert torch.equal(packed.cpu(), torch.ops.actnn_mm.pack_bits(values, bits))
    assert torch.equal(torch.ops.actnn_mm.unpack_bits(packed, bits, 1234).cpu(), values)


def _positive_case(numel, dtype):
    g = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=g).to(dtype)
    special = torch.tensor([0.0, -0.0, float('nan'), float('inf'), -float('inf'), 1e-30, -1e-30])
    values[:len(special)] = special[:numel].to(dtype)
    return values


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('numel', [0, 1, 7, 8, 9, 1000, 40961])
@pytest.mark.parametrize('device', DEVICES)
def test_pack_positive_matches_reference_and_torch(numel, dtype, device):
    values = _positive_case(numel, dtype)
    packed = torch.ops.actnn_mm.pack_positive(values.to(device)).cpu()
    assert torch.equal(packed, reference.pack_positive(values))
    assert torch.equal(packed, torch.ops.actnn_mm.pack_bits(values > 0, 1))  # NaN, -0: not set


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_pack_positive_checks_and_opcheck(device):
    values = _positive_case(100, torch.float32).to(device)
    with pytest.raises(RuntimeError, match='contiguous values'):
        torch.ops.actnn_mm.pack_positive(values.view(10, 10).t())
    with pytest.raises(RuntimeError, match='float32, float16 or bfloat16'):
        torch.ops.actnn_mm.pack_positive(values.double())
    torch.library.opcheck(torch.ops.actnn_mm.pack_positive, (values,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', DTYPES)
def test_pack_positive_cuda_matches_cpu(dtype):
    values = _positive_case(4099, dtype)
    gpu = torch.ops.actnn_mm.pack_positive(values.cuda())
    assert torch.equal(gpu.cpu(), torch.ops.actnn_mm.pack_positive(values))


def _mask_case(numel, dtype):
    g = torch.Generator().manual_seed(numel)
    values = (torch.randn(numel, generator=g) * 3).to(dtype)
    keep = torch.rand(numel, generator=g) < 0.5
    return values, keep, reference.pack_bits(keep, 1)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('numel', [0, 1, 7, 8, 9, 1000, 40961])
@pytest.mark.parametrize('scale', [1.0, 1 / 0.3])
@pytest.mark.parametrize('device', DEVICES)
def test_apply_mask_matches_reference_and_torch(numel, dtype, scale, device):
    values, keep, mask = _mask_case(numel, dtype)
    out = torch.ops.actnn_mm.apply_mask(values.to(device), mask.to(device), scale).cpu()
    assert torch.equal(out, reference.apply_mask(values, mask, scale))
    assert torch.equal(out, torch.where(keep, (values.float() * scale).to(dtype), 0))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_apply_mask_checks_and_opcheck(device):
    values, _, mask = _mask_case(100, torch.float32)
    values, mask = values.to(device), mask.to(device)
    with pytest.raises(RuntimeError, match='at least 13 bytes'):
        torch.ops.actnn_mm.apply_mask(values, mask[:12], 1.0)
    with pytest.raises(RuntimeError, match='contiguous values'):
        torch.ops.actnn_mm.apply_mask(values.view(10, 10).t(), mask, 1.0)
    with pytest.raises(RuntimeError, match='float32, float16 or bfloat16'):
        torch.ops.actnn_mm.apply_mask(values.double(), mask, 1.0)
    torch.library.opcheck(torch.ops.actnn_mm.apply_mask, (values, mask, 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', DTYPES)
def test_apply_mask_cuda_matches_cpu(dtype):
    values, _, mask = _mask_case(4099, dtype)
    gpu = torch.ops.actnn_mm.apply_mask(values.cuda(), mask.cuda(), 1.5)
    assert torch.equal(gpu.cpu(), torch.ops.actnn_mm.apply_mask(values, mask, 1.5))
    values = values[:3 * 37 * 35].view(3, 35, 37)
    gpu = torch.ops.actnn_mm.apply_mask_transposed(values.cuda(), mask.cuda(), 1.5)
    assert torch.equal(gpu.cpu(), torch.ops.actnn_mm.apply_mask_transposed(values, mask, 1.5))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('shape', [(0, 4, 4), (1, 1, 1), (2, 7, 3), (3, 40, 33), (2, 64, 64),
                                   (2, 49, 16), (3, 9, 8)])
@pytest.mark.parametrize('device', DEVICES)
def test_apply_mask_transposed_matches_reference_and_torch(shape, dtype, device):
    n, cols, rows = shape
    values, keep, mask = _mask_case(n * cols * rows, dtype)
    values = values.view(shape)
    out = torch.ops.actnn_mm.apply_mask_transposed(values.to(device), mask.to(device), 2.5).cpu()
    assert torch.equal(out, reference.apply_mask_transposed(values, mask, 2.5))
    keep = keep.view(n, rows, cols).transpose(1, 2)  # the mask's bits are in (rows, cols) order
    assert torch.equal(out, torch.where(keep, (values.float() * 2.5).to(dtype), 0))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_apply_mask_transposed_checks_and_opcheck(device):
    values, _, mask = _mask_case(120, torch.float32)
    values, mask = values.to(device), mask.to(device)
    with pytest.raises(RuntimeError, match=r'\(N, cols, rows\)'):
        torch.ops.actnn_mm.apply_mask_transposed(values, mask, 1.0)
    with pytest.raises(RuntimeError, match='at least 15 bytes'):
        torch.ops.actnn_mm.apply_mask_transposed(values.view(2, 6, 10), mask[:12], 1.0)
    torch.library.opcheck(torch.ops.actnn_mm.apply_mask_transposed,
                          (values.view(2, 6, 10), mask, 2.0))


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('bits', [2, MIXED])
@pytest.mark.parametrize('shape', [(37, 5, 6, 7), (3, 64, 8, 12), (2, 40, 9, 9), (1, 1, 3, 3),
                                   (4, 3, 1, 1), (0, 3, 4, 4), (2, 40, 128, 100),
                                   (1, 24, 301, 300)])
def test_dequantize_into_channels_last_is_bit_identical(dtype, bits, shape):
    # channels and pixels below, at and across the CPU kernel's 32 x 32 tiles and 8 x 8 blocks,
    # and (the last two) samples dequantized in several blocks of 16 channels and a partial one
    x = (torch.randn(shape) * 3).to(dtype)
    c = quantize(x, _bits_for(x, bits), group_size=64)
    y = dequantize(c, torch.channels_last)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, dequantize(c))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
# one span of columns per sample, or several (a span's buffer holds about 512 KiB of rows),
# rows and columns not multiples of 8
@pytest.mark.parametrize('n,rows,cols', [(5, 70, 33), (2, 3000, 197), (3, 1, 5), (2, 0, 9)])
@pytest.mark.parametrize('device', DEVICES)
def test_dequantize_transposed_matches_reference(dtype, n, rows, cols, device):
    x = (torch.randn(n, rows * cols) * 3).to(dtype)
    c = quantize(x, _bits_for(x, MIXED), group_size=48)
    args = (c.data, c.meta, c.sample_meta, c.bits, c.offsets, n, rows, cols, 48, dtype)
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.ops.actnn_mm.dequantize_transposed(*on_device)
    assert out.shape == (n, cols, rows)
    assert torch.equal(out.cpu(), reference.dequantize_transposed(*args))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
def test_dequantize_transposed_checks_its_sizes(dtype):
    c = quantize((torch.randn(5, 70 * 33) * 3).to(dtype), 2, group_size=48)
    with pytest.raises(RuntimeError, match='meta must be .* shape'):  # 70 x 34 values per sample
        torch.ops.actnn_mm.dequantize_transposed(c.data, c.meta, c.sample_meta, c.bits,
                                                 c.offsets, 5, 70, 34, 48, dtype)
    with pytest.raises(RuntimeError, match=r'sample_meta must be .* shape \(5, 2\)'):
        torch.ops.actnn_mm.dequantize_transposed(c.data, c.meta, c.sample_meta[:4], c.bits,
                                                 c.offsets, 5, 70, 33, 48, dtype)


def _batch_norm_case(dtype, rows=300, channels=24):
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(rows, channels, generator=gen).to(dtype)
    xh = torch.randn(rows, channels, generator=gen).to(dtype)
    coef = torch.randn(3, channels, generator=gen)
    return grad, xh, coef


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('rows,channels', [(300, 24), (5000, 3), (1, 1), (0, 4), (7, 515),
                                           (40000, 2)])
@pytest.mark.parametrize('device', DEVICES)
def test_batch_norm_ops_match_reference(dtype, rows, channels, device):
    grad, xh, coef = _batch_norm_case(dtype, rows, channels)
    sums = torch.ops.actnn_mm.batch_norm_sums(grad.to(device), xh.to(device)).cpu()
    assert sums.shape == (3, channels) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, reference.batch_norm_sums(grad, xh), rtol=1e-5, atol=1e-4)
    got, want = xh.to(device), xh.clone()
    torch.ops.actnn_mm.batch_norm_combine(got, grad.to(device), coef.to(device))
    reference.batch_norm_combine(want, grad, coef)
    assert torch.equal(got.cpu(), want)  # the same float32 operations in the same order


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
def test_batch_norm_sums_do_not_depend_on_the_threads():
    # chunks of rows in a fixed order: the same bits with 1 or 2 threads, call after call
    grad, xh, _ = _batch_norm_case(torch.float32, 20011, 7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.actnn_mm.batch_norm_sums(grad, xh)
        torch.set_num_threads(2)
        two = [torch.ops.actnn_mm.batch_norm_sums(grad, xh) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one, sums) for sums in two)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_batch_norm_ops_check_and_opcheck(device):
    grad, xh, coef = (t.to(device) for t in _batch_norm_case(torch.float32))
    with pytest.raises(RuntimeError, match=r'one \(rows, channels\) shape'):
        torch.ops.actnn_mm.batch_norm_sums(grad, xh[:-1])
    with pytest.raises(RuntimeError, match=r'one \(rows, channels\) shape'):
        torch.ops.actnn_mm.batch_norm_sums(grad.t(), xh.t())  # not contiguous
    with pytest.raises(RuntimeError, match=r'one \(rows, channels\) shape'):
        torch.ops.actnn_mm.batch_norm_combine(xh, grad.double().float().bfloat16(), coef)
    with pytest.raises(RuntimeError, match=r'coef of shape \(3, 24\)'):
        torch.ops.actnn_mm.batch_norm_combine(xh, grad, coef[:2])
    with pytest.raises(RuntimeError, match='float32, float16 or bfloat16'):
        torch.ops.actnn_mm.batch_norm_sums(grad.double(), xh.double())
    torch.library.opcheck(torch.ops.actnn_mm.batch_norm_sums, (grad, xh))
    torch.library.opcheck(torch.ops.actnn_mm.batch_norm_combine, (xh.clone(), grad, coef))


def test_batch_norm_ops_with_the_reference(monkeypatch):
    grad, xh, coef = _batch_norm_case(torch.float32)
    expected = reference.batch_norm_sums(grad, xh)
    monkeypatch.setattr(ops, '_C', None)
    monkeypatch.setattr(ops, '_IMPORT_ERROR', ImportError('not built'), raising=False)
    monkeypatch.setattr(ops, '_warned', True)
    assert torch.equal(ops.batch_norm_sums(grad, xh), expected)
    got = xh.clone()
    ops.batch_norm_combine(got, grad, coef)
    assert torch.equal(got, coef[0] * xh + coef[1] * grad + coef[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', DTYPES)
def test_batch_norm_ops_cuda_match_cpu(dtype):
    grad, xh, coef = _batch_norm_case(dtype, 100000, 40)
    # the same chunks added in the same order, in double, run after run: the same bits
    sums = [torch.ops.actnn_mm.batch_norm_sums(grad.cuda(), xh.cuda()).cpu() for _ in range(3)]
    assert all(torch.equal(s, torch.ops.actnn_mm.batch_norm_sums(grad, xh)) for s in sums)
    gpu, cpu = xh.cuda(), xh.clone()
    torch.ops.actnn_mm.batch_norm_combine(gpu, grad.cuda(), coef.cuda())
    torch.ops.actnn_mm.batch_norm_combine(cpu, grad, coef)
    assert torch.equal(gpu.cpu(), cpu)


# (rows, values per row, group_size, max_groups, max_values, blocks) of the allocator's statistics:
# many groups (sampled with a stride), a few (all read), a short row (one partial group), rows
# below and above max_values, an empty row and an empty batch.
ROW_STATS = [(16, 256 * 200 + 13, 256, 64, 16384, 16), (4, 1000, 64, 64, 16384, 16),
             (3, 100, 256, 64, 16384, 16), (5, 40000, 8, 7, 1000, 3), (2, 0, 8, 64, 16384, 16),
             (0, 7, 8, 64, 16384, 16)]


def _row_stats(x, case):
    *_, group_size, max_groups, max_values, blocks = case
    return (torch.ops.actnn_mm.mean_square_range(x, group_size, max_groups),
            torch.ops.actnn_mm.sum_of_squares(x, max_values, blocks),
            reference.mean_square_range(x, group_size, max_groups),
            reference.sum_of_squares(x, max_values, blocks))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('case', ROW_STATS)
@pytest.mark.parametrize('device', DEVICES)
def test_allocator_statistics_match_reference(dtype, case, device):
    rows, m = case[:2]
    x = (torch.randn(rows, m, generator=torch.Generator().manual_seed(0)) *
         torch.logspace(-2, 2, max(rows, 1))[:rows, None]).to(dtype)
    ranges, squares, want_ranges, want_squares = _row_stats(x.to(device), case)
    ranges, squares = ranges.cpu(), squares.cpu()
    want_ranges, want_squares = want_ranges.cpu(), want_squares.cpu()
    assert ranges.shape == squares.shape == (rows,) and ranges.dtype == torch.float64
    torch.testing.assert_close(ranges, want_ranges, rtol=1e-9, atol=0)
    torch.testing.assert_close(squares, want_squares, rtol=1e-5, atol=0)  # float32 sums by run


def test_allocator_statistics_read_the_planned_values():
    # 130 groups of 8, at most 64 read: every third (0, 3, ..., 129), whose ranges are 0..129.
    x = torch.zeros(1, 130 * 8)
    x.view(130, 8)[:, 0] = torch.arange(130.0)
    want = sum(float(k * k) for k in range(0, 130, 3)) / 44
    assert reference.mean_square_range(x, 8, 64).item() == pytest.approx(want)
    # 3 blocks of 333 values at 0, 1000, 2000 of 3001 values, scaled by 3001 / 999
    y = torch.full((1, 3001), 5.0)
    for start in (0, 1000, 2000):
        y[0, start:start + 333] = 1.0
    assert reference.sum_of_squares(y, 1000, 3).item() == pytest.approx(3001.0)
    if extension_loaded():
        assert torch.ops.actnn_mm.mean_square_range(x, 8, 64).item() == pytest.approx(want)
        assert torch.ops.actnn_mm.sum_of_squares(y, 1000, 3).item() == pytest.approx(3001.0)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_allocator_statistics_reveal_non_finite_rows(bad):
    x = torch.randn(3, 2048)
    x[1, 5] = bad  # in the first group and block, which are always read
    ranges, squares, want_ranges, want_squares = _row_stats(x, ROW_STATS[0])
    for stats in (ranges, squares, want_ranges, want_squares):
        assert stats.isfinite().tolist() == [True, False, True]


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_allocator_statistics_check_and_opcheck(device):
    x = torch.randn(4, 300, device=device)
    with pytest.raises(RuntimeError, match=r'contiguous \(N, M\)'):
        torch.ops.actnn_mm.mean_square_range(x.t(), 8, 4)
    with pytest.raises(RuntimeError, match=r'contiguous \(N, M\)'):
        torch.ops.actnn_mm.sum_of_squares(x[None], 100, 4)
    with pytest.raises(RuntimeError, match='float32, float16 or bfloat16'):
        torch.ops.actnn_mm.mean_square_range(x.double(), 8, 4)
    with pytest.raises(RuntimeError, match='positive group_size and max_groups'):
        torch.ops.actnn_mm.mean_square_range(x, 0, 4)
    with pytest.raises(RuntimeError, match='0 < blocks <= max_values'):
        torch.ops.actnn_mm.sum_of_squares(x, 3, 4)
    torch.library.opcheck(torch.ops.actnn_mm.mean_square_range, (x, 32, 4))
    torch.library.opcheck(torch.ops.actnn_mm.sum_of_squares, (x, 100, 4))


def test_allocator_statistics_with_the_reference(monkeypatch):
    x = torch.randn(4, 3000)
    monkeypatch.setattr(ops, '_C', None)
    monkeypatch.setattr(ops, '_IMPORT_ERROR', ImportError('not built'), raising=False)
    monkeypatch.setattr(ops, '_warned', True)
    assert torch.equal(ops.mean_square_range(x, 64, 8), reference.mean_square_range(x, 64, 8))
    assert torch.equal(ops.sum_of_squares(x, 1000, 4), reference.sum_of_squares(x, 1000, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('case', ROW_STATS)
def test_allocator_statistics_cuda_match_cpu(dtype, case):
    x = torch.randn(*case[:2]).to(dtype)
    # the same terms added in the same order as the CPU's: the same bits
    for got, want in zip(_row_stats(x.cuda(), case)[:2], _row_stats(x, case)[:2]):
        assert torch.equal(got.cpu(), want)


# (kernel, stride, padding, dilation, ceil_mode) of max poolings
WINDOWS = [((3, 3), (2, 2), (1, 1), (1, 1), False), ((2, 2), (2, 2), (0, 0), (1, 1), True),
           ((3, 2), (1, 2), (1, 0), (2, 3), True), ((5, 5), (3, 3), (2, 2), (1, 1), False),
           ((20, 15), (1, 1), (0, 0), (1, 1), False)]


def _window_case(window, channels_last):
    """Max-pool argmax indices as the window ops take them, and the window arguments."""
    kernel, stride, padding, dilation, ceil_mode = window
    x = torch.randn(2, 3, 23, 29, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation,
                                                        ceil_mode)
    if channels_last:
        view = indices.permute(0, 2, 3, 1)
    else:
        view = indices.reshape(6, *indices.shape[2:], 1)
    assert view.is_contiguous()
    return view, (x.shape[-1], list(kernel), list(stride), list(padding), list(dilation))


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('device', DEVICES)
def test_window_ops_match_reference_and_invert(window, channels_last, device):
    indices, args = _window_case(window, channels_last)
    dtype = torch.uint8 if window[0][0] * window[0][1] <= 256 else torch.int32
    offsets = torch.ops.actnn_mm.window_offsets(indices.to(device), *args, dtype)
    restored = torch.ops.actnn_mm.window_indices(offsets, *args).cpu()
    offsets = offsets.cpu()
    assert offsets.dtype == dtype and offsets.shape == indices.shape
    assert torch.equal(offsets, reference.window_offsets(indices, *args, dtype))
    assert int(offsets.max()) < window[0][0] * window[0][1] and int(offsets.min()) >= 0
    assert torch.equal(restored, indices)
    assert torch.equal(reference.window_indices(offsets, *args), indices)
    assert torch.equal(torch.ops.actnn_mm.window_indices(offsets.int(), *args), indices)


@pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')
@pytest.mark.parametrize('device', DEVICES)
def test_window_ops_check_and_opcheck(device):
    indices, args = _window_case(WINDOWS[0], False)
    indices = indices.to(device)
    with pytest.raises(RuntimeError, match='contiguous int64'):
        torch.ops.actnn_mm.window_offsets(indices.transpose(1, 2), *args, torch.uint8)
    with pytest.raises(RuntimeError, match='at most 256'):
        torch.ops.actnn_mm.window_offsets(indices, args[0], [17, 17], *args[2:], torch.uint8)
    with pytest.raises(RuntimeError, match='positive width'):
        torch.ops.actnn_mm.window_offsets(indices, args[0], args[1], [0, 1], *args[3:],
                                          torch.uint8)
    with pytest.raises(RuntimeError, match='uint8 or int32'):
        torch.ops.actnn_mm.window_indices(indices, *args)
    offsets = torch.ops.actnn_mm.window_offsets(indices, *args, torch.uint8)
    torch.library.opcheck(torch.ops.actnn_mm.window_offsets, (indices, *args, torch.uint8))
    torch.library.opcheck(torch.ops.actnn_mm.window_indices, (offsets, *args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('window', WINDOWS)
def test_window_ops_cuda_match_cpu(window):
    indices, args = _window_case(window, False)
    offsets = torch.ops.actnn_mm.window_offsets(indices, *args, torch.int32)
    assert torch.equal(
        torch.ops.actnn_mm.window_offsets(indices.cuda(), *args, torch.int32).cpu(), offsets)
    assert torch.equal(torch.ops.actnn_mm.window_indices(offsets.cuda(), *args).cpu(), indices)
