"""QBatchNorm1d/2d/3d (and QSyncBatchNorm in one process) against torch: outputs, gradients and
running statistics, in training and eval mode, with every option, and the in-place path of a
BatchNorm fed by a convolution alone."""
import copy

import pytest
import torch
from torch import nn

import actnn_mm
from actnn_mm.compress.codec import statistics_bits
from actnn_mm.layers import norm
from qchecks import assert_close_grads, assert_unbiased, grads, settings, spy_quantize

SHAPES = {nn.BatchNorm1d: [(6, 4), (3, 4, 5)], nn.BatchNorm2d: [(3, 4, 5, 5)],
          nn.BatchNorm3d: [(2, 4, 3, 3, 3)], nn.SyncBatchNorm: [(3, 4, 5, 5)]}
Q = {nn.BatchNorm1d: actnn_mm.QBatchNorm1d, nn.BatchNorm2d: actnn_mm.QBatchNorm2d,
     nn.BatchNorm3d: actnn_mm.QBatchNorm3d, nn.SyncBatchNorm: actnn_mm.QSyncBatchNorm}
OPTIONS = {
    'default': {},
    'no_affine': dict(affine=False),
    'no_running_stats': dict(track_running_stats=False),
    'cumulative_momentum': dict(momentum=None),
}
CASES = [(cls, shape) for cls, shapes in SHAPES.items() for shape in shapes]


def make(cls, shape, options=None, eval_mode=False, channels_last=False,
         dtype=torch.float32, device='cpu'):
    """(torch layer, the same converted, input), made on the CPU (the same values on every
    device), then moved to ``device``."""
    torch.manual_seed(0)
    ref = cls(4, **(options or {}))
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    if ref.track_running_stats:
        ref.running_mean.uniform_(-0.5, 0.5)
        ref.running_var.uniform_(0.5, 2)
    ref.train(not eval_mode)
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, x = ref.to(device), x.to(device)
    q = copy.deepcopy(ref)
    q.__class__ = Q[cls]
    return ref, q, x


def buffers(module):
    return {name: b.clone() for name, b in module.named_buffers()}


def assert_same_buffers(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name].double(), want[name].double(), rtol=1e-5, atol=1e-6), name


def ids(cases):
    return [f'{cls.__name__}-{len(shape)}d' for cls, shape in cases]


@pytest.mark.parametrize('cls,shape', CASES, ids=ids(CASES))
@pytest.mark.parametrize('option', list(OPTIONS))
@pytest.mark.parametrize('eval_mode', [False, True])
def test_l0_equals_torch(cls, shape, option, eval_mode, device):
    ref, q, x = make(cls, shape, OPTIONS[option], eval_mode, device=device)
    with settings('L0'):
        got = [grads(q, [x]) for _ in range(2)]  # twice: running statistics evolve
    want = [grads(ref, [x]) for _ in range(2)]
    for g, w in zip(got, want):
        assert_close_grads(g, w, rtol=1e-5)
    assert_same_buffers(buffers(q), buffers(ref))


@pytest.mark.parametrize('cls,shape', CASES, ids=ids(CASES))
@pytest.mark.parametrize('eval_mode', [False, True])
def test_8bit_close(cls, shape, eval_mode, device):
    ref, q, x = make(cls, shape, eval_mode=eval_mode, device=device)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    assert_close_grads(got, want, rtol=3e-2)
    # normalized, then scaled and shifted in place: within float rounding of torch's fused pass
    # (on CUDA torch's pass is cuDNN's, with its own statistics and fused multiply-adds)
    tol = 1e-6 if device == 'cpu' else 1e-5
    torch.testing.assert_close(got['out'], want['out'], rtol=tol, atol=tol)
    assert_close_grads({'bias': got['bias']}, {'bias': want['bias']}, rtol=1e-6)  # exact
    assert not torch.equal(got['weight'], want['weight'])
    assert_same_buffers(buffers(q), buffers(ref))


@pytest.mark.parametrize('cls,shape', [(nn.BatchNorm2d, (4, 4, 6, 6)),
                                       (nn.BatchNorm1d, (16, 4)),
                                       (nn.BatchNorm3d, (2, 4, 3, 4, 4))],
                         ids=['2d', '1d', '3d'])
@pytest.mark.parametrize('eval_mode', [False, True])
def test_2bit_unbiased(cls, shape, eval_mode, device):
    ref, q, x = make(cls, shape, eval_mode=eval_mode, device=device)
    want = grads(ref, [x])
    keys = ['weight'] if eval_mode else ['weight', 'input0']  # eval: input grad is exact
    with settings('L3'):
        q.eval() if eval_mode else q.train()
        assert_unbiased(lambda: grads(q, [x]), want, k=128, keys=keys)


def test_2bit_unbiased_when_groups_mix_channel_scales(device):
    """Few values per channel: a quantization group spans channels of 10^4 times different
    scales, so narrow channels get rounding noise far above their spread; the input gradient's
    quadratic self term would carry that variance as a bias."""
    torch.manual_seed(0)
    ref, q = nn.BatchNorm2d(64).to(device), actnn_mm.QBatchNorm2d(64).to(device)
    x = (torch.randn(2, 64, 2, 2) * torch.logspace(-2, 2, 64).view(1, -1, 1, 1) + 3).to(device)
    want = grads(ref, [x])
    # 2 bits for the values of these 256-value samples, with their statistics
    with settings('L3', activation_compression_bits=[2 + statistics_bits(256, 256)]):
        assert_unbiased(lambda: grads(q, [x]), want, k=200, keys=['input0', 'weight'])


@pytest.mark.parametrize('channels_last', [False, True])
def test_bf16_input_channels_last(channels_last):
    ref, q, x = make(nn.BatchNorm2d, (3, 4, 5, 5), channels_last=channels_last,
                     dtype=torch.bfloat16)
    want = grads(ref, [x])
    with settings('L0'):
        exact = grads(q, [x])
    with settings('L3'):
        assert_unbiased(lambda: grads(q, [x]), want, k=48, keys=['weight', 'input0'])
    assert exact['out'].dtype == torch.bfloat16 and exact['weight'].dtype == torch.float32
    assert_close_grads(exact, want, rtol=1e-6)
    if channels_last:
        assert exact['input0'].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('shape', [(6, 4, 5, 7), (40, 4)])
def test_gradient_with_channels_innermost(shape, monkeypatch, device):
    # channels_last (from a CPU convolution's backward) or 2-D: the fused batch_norm ops
    fused = []
    sums = norm.ops.batch_norm_sums
    monkeypatch.setattr(norm.ops, 'batch_norm_sums', lambda *a: fused.append(1) or sums(*a))
    ref, q, x = make(nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d, shape,
                     device=device)
    layout = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=layout)
    want = grads(ref, [x], weight)
    with settings('L2', activation_compression_bits=[8]):
        assert_close_grads(grads(q, [x], weight), want, rtol=2e-2)
    with settings('L3'):
        assert_unbiased(lambda: grads(q, [x], weight), want, k=128, keys=['input0', 'weight'])
    assert len(fused) == 1 + 128


def test_in_place_after_a_convolution(device, monkeypatch):
    """A BatchNorm that only its convolution feeds (consecutive children of an nn.Sequential,
    see actnn_mm.inplace) normalizes the convolution's output in place: close to torch at 8 bits
    (running statistics too), unbiased at 2 bits."""
    overwrites = []
    normalize = norm._normalize_then_affine
    monkeypatch.setattr(norm, '_normalize_then_affine',
                        lambda *args: overwrites.append(args[-1]) or normalize(*args))
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(device)
    q = copy.deepcopy(ref)
    with settings('L3'):
        actnn_mm.convert(q)
    x = torch.randn(4, 3, 8, 8).to(device)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    # the convolution's bias gradient is 0 up to rounding (the BatchNorm removes the mean)
    del got['0.bias'], want['0.bias']
    assert_close_grads(got, want, rtol=3e-2)
    assert_same_buffers(buffers(q), buffers(ref))
    with settings('L3'):
        assert_unbiased(lambda: grads(q, [x]), want, k=96, keys=['input0', '0.weight', '1.weight'])
    assert overwrites == [True] * 97


def test_eval_with_trainable_affine_compresses_its_input(monkeypatch):
    """mmdet's norm_eval=True keeps the affine weights training: the input is still needed."""
    calls = spy_quantize(monkeypatch)
    ref, q, x = make(nn.BatchNorm2d, (3, 4, 5, 5), eval_mode=True)
    with settings('L3'):
        grads(q, [x.detach()])  # input needs no grad, weight does
    assert len(calls) == 1
    assert q.actnn_saved_bytes > 0


def test_frozen_eval_keeps_nothing(monkeypatch):
    calls = spy_quantize(monkeypatch)
    ref, q, x = make(nn.BatchNorm2d, (3, 4, 5, 5), eval_mode=True)
    ref.requires_grad_(False)
    q.requires_grad_(False)
    with settings('L3'):
        got = grads(q, [x])
        with torch.no_grad():
            q.train()
            q(x)  # training-mode statistics update without autograd
    assert not calls
    assert q.actnn_saved_bytes == 0
    assert_close_grads(got, grads(ref, [x]), rtol=1e-6)
    with torch.no_grad():
        ref.train()
        ref(x)
    assert_same_buffers(buffers(q), buffers(ref))


def test_one_value_per_channel_in_training_raises():
    _, q, _ = make(nn.BatchNorm1d, (1, 4))
    with settings('L3'):
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            q(torch.randn(1, 4, requires_grad=True))


def test_wrong_input_dims_raise():
    _, q, _ = make(nn.BatchNorm2d, (3, 4, 5, 5))
    with pytest.raises(ValueError, match='4D input'):
        q(torch.randn(3, 4, 5, requires_grad=True))


@pytest.mark.parametrize('level', ['L0', 'L3'])
def test_training_with_only_the_bias_trainable(level):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    ref.weight.requires_grad_(False)
    q = copy.deepcopy(ref)
    x = torch.randn(3, 4, 5, 5)
    with settings(level):
        actnn_mm.QModule(q)
        (q(x) * x).sum().backward()
    (ref(x) * x).sum().backward()
    torch.testing.assert_close(q.bias.grad, ref.bias.grad)
    assert q.weight.grad is None
