"""QGroupNorm and QLayerNorm against torch: exact at L0, close at 8 bits, unbiased at 2 bits (with
the rounding-variance correction, which the last test shows is needed), every option."""
import copy

import pytest
import torch
from torch import nn

import actnn_mm
from actnn_mm.layers import groupnorm, saved
from qchecks import assert_close_grads, assert_unbiased, grads, settings

CASES = {
    'gn-4d': (nn.GroupNorm, (2, 8), (3, 8, 5, 5)),
    'gn-2d': (nn.GroupNorm, (2, 32), (6, 32)),
    'gn-5d': (nn.GroupNorm, (1, 4), (2, 4, 3, 3, 3)),
    'ln-blc': (nn.LayerNorm, (16,), (3, 7, 16)),
    'ln-2d': (nn.LayerNorm, (16,), (6, 16)),
    'ln-last2': (nn.LayerNorm, ((4, 5),), (3, 2, 4, 5)),
    'ln-unbatched': (nn.LayerNorm, (16,), (16,)),
}
OPTIONS = {
    nn.GroupNorm: {'default': {}, 'no_affine': dict(affine=False)},
    nn.LayerNorm: {'default': {}, 'no_affine': dict(elementwise_affine=False),
                   'no_bias': dict(bias=False)},
}
Q = {nn.GroupNorm: actnn_mm.QGroupNorm, nn.LayerNorm: actnn_mm.QLayerNorm}
TWO_BITS = dict(activation_compression_bits=[2], adaptive=False)  # L3 at a uniform 2 bits


def make(case, options=None, dtype=torch.float32, channels_last=False, device='cpu'):
    """(torch layer, the same converted, input), made on the CPU (the same values on every
    device), then moved to ``device``."""
    cls, args, shape = CASES[case]
    torch.manual_seed(0)
    ref = cls(*args, **(options or {}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if name == 'weight' else p.uniform_(-0.5, 0.5)
    x = (torch.randn(shape) * 3 + 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, x = ref.to(device), x.to(device)
    q = copy.deepcopy(ref)
    q.__class__ = Q[cls]
    return ref, q, x


def option_cases():
    return [(case, option) for case, (cls, _, _) in CASES.items() for option in OPTIONS[cls]]


@pytest.mark.parametrize('case,option', option_cases())
@pytest.mark.parametrize('level', ['L0', 'L1'])
def test_uncompressed_equals_torch(case, option, level, device):
    ref, q, x = make(case, OPTIONS[CASES[case][0]][option], device=device)
    with settings(level):
        got = grads(q, [x])
    assert_close_grads(got, grads(ref, [x]), rtol=0)
    assert q.actnn_saved_bytes == q.actnn_full_bytes == x.nbytes


@pytest.mark.parametrize('case,option', option_cases())
def test_8bit_close(case, option, device):
    ref, q, x = make(case, OPTIONS[CASES[case][0]][option], device=device)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    assert_close_grads(got, want, rtol=2e-2)
    assert torch.equal(got['out'], want['out'])
    if 'bias' in want:
        assert_close_grads({'bias': got['bias']}, {'bias': want['bias']}, rtol=1e-6)  # exact
    assert not torch.equal(got['input0'], want['input0'])


@pytest.mark.parametrize('case', ['gn-4d', 'gn-2d', 'ln-blc', 'ln-last2'])
def test_2bit_unbiased(case, device):
    ref, q, x = make(case, device=device)
    want = grads(ref, [x])
    with settings('L3', **TWO_BITS):
        assert_unbiased(lambda: grads(q, [x]), want, k=128, keys=['input0', 'weight'])


@pytest.mark.parametrize('case', ['gn-4d', 'ln-blc'])
def test_2bit_unbiased_without_affine(case, device):
    ref, q, x = make(case, OPTIONS[CASES[case][0]]['no_affine'], device=device)
    want = grads(ref, [x])
    with settings('L3', **TWO_BITS):
        assert_unbiased(lambda: grads(q, [x]), want, k=96, keys=['input0'])


@pytest.mark.parametrize('case', ['gn-4d', 'ln-blc'])
@pytest.mark.parametrize('params', ['bf16', 'fp32'])
def test_bf16_inputs(case, params):
    """bf16 inputs with bf16 parameters or float32 ones (CPU mixed types)."""
    ref, q, x = make(case, dtype=torch.bfloat16)
    if params == 'bf16':
        ref, q = ref.bfloat16(), q.bfloat16()
    want = grads(ref, [x])
    with settings('L0'):
        assert_close_grads(grads(q, [x]), want, rtol=0)
    with settings('L3', **TWO_BITS):
        got = grads(q, [x])
        assert got['input0'].dtype == torch.bfloat16 and got['weight'].dtype == want['weight'].dtype
        assert_unbiased(lambda: grads(q, [x]), want, k=64, keys=['input0', 'weight'])


def test_channels_last_layout_kept():
    ref, q, x = make('gn-4d', channels_last=True)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    assert_close_grads(got, want, rtol=2e-2)
    assert got['input0'].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('case', ['gn-4d', 'ln-blc'])
def test_keeps_two_bits_per_value(case):
    cls, args, _ = CASES[case]
    ref, q, _ = make(case)
    x = torch.randn((4, 8, 32, 32) if cls is nn.GroupNorm else (4, 128, 16))
    with settings('L3', **TWO_BITS):
        q(x.requires_grad_())
    assert q.actnn_full_bytes == x.nbytes
    assert x.nbytes / q.actnn_saved_bytes > 14


@pytest.mark.parametrize('case', ['gn-4d', 'ln-blc'])
@pytest.mark.parametrize('trains', ['bias', 'input', 'weight'])
def test_partial_gradients(case, trains):
    """Only some of input, weight, bias need a gradient; nothing is kept for the bias alone."""
    ref, q, x = make(case)
    for module in (ref, q):
        module.weight.requires_grad_(trains == 'weight')
        module.bias.requires_grad_(trains == 'bias')
    inputs = [x] if trains == 'input' else [x.detach()]
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, inputs) if trains == 'input' else _grads_no_input(q, x)
    want = grads(ref, inputs) if trains == 'input' else _grads_no_input(ref, x)
    assert got.keys() == want.keys()
    assert_close_grads(got, want, rtol=1e-6 if trains == 'bias' else 2e-2)
    assert (q.actnn_saved_bytes == 0) is (trains == 'bias')


def _grads_no_input(module, x):
    out = module(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    return {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def test_no_grad_runs_plain_op():
    ref, q, x = make('ln-blc')
    with torch.no_grad():
        out = q(x.requires_grad_())
    assert out.grad_fn is None and torch.equal(out, ref(x).detach())
    assert not hasattr(q, 'actnn_saved_bytes')


def test_wrong_inputs_raise_as_torch():
    _, gn, _ = make('gn-4d')
    _, ln, _ = make('ln-blc')
    with pytest.raises(RuntimeError, match='number of channels'):
        gn(torch.randn(2, 6, 3, requires_grad=True))
    with pytest.raises(RuntimeError, match='at least 2 dimensions'):
        gn(torch.randn(8, requires_grad=True))
    with pytest.raises(RuntimeError, match='normalized_shape'):
        ln(torch.randn(2, 3, 5, requires_grad=True))


@pytest.mark.parametrize('level,converted', [('L1', False), ('L2', True)])
def test_qmodule_converts_keeping_state(level, converted):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Flatten(2),
                          nn.LayerNorm(16, bias=False))
    keys = list(model.state_dict())
    with settings(level):
        actnn_mm.QModule(model)
    assert (type(model[1]) is actnn_mm.QGroupNorm) is converted
    assert (type(model[3]) is actnn_mm.QLayerNorm) is converted
    assert list(model.state_dict()) == keys
    actnn_mm.revert(model)
    assert type(model[1]) is nn.GroupNorm and type(model[3]) is nn.LayerNorm


@pytest.mark.parametrize('cls,shape', [(nn.LayerNorm, (64, 4)), (nn.GroupNorm, (16, 8, 2))],
                         ids=['ln', 'gn'])
def test_correction_removes_the_rounding_variance_bias(monkeypatch, cls, shape):
    """Noise of the same variance on every normalized value (+-1.5 added to an 8-bit copy): the
    correction leaves the input gradient exactly unbiased, and without it the bias shows.

    (Real stochastic rounding gives each value its own variance; the correction removes the
    group's mean, leaving a residual that changes sign from value to value, see the module doc.)
    """
    torch.manual_seed(0)
    ref = cls(4) if cls is nn.LayerNorm else cls(4, 8)
    q = copy.deepcopy(ref)
    q.__class__ = Q[cls]
    x = torch.randn(shape) * 3 + 2
    want = grads(ref, [x])
    dequantize = saved.dequantize
    monkeypatch.setattr(saved, 'dequantize', lambda c, *layout: dequantize(c, *layout).add_(
        torch.randint(0, 2, c.shape, dtype=c.dtype).mul_(3).sub_(1.5)))
    with settings('L2', activation_compression_bits=[8]):
        assert_unbiased(lambda: grads(q, [x]), want, k=256, keys=['input0'])
        monkeypatch.setattr(groupnorm, '_rounding_bias', lambda mean_xh2, *_: 0 * mean_xh2)
        with pytest.raises(AssertionError, match='input0: mean error'):
            assert_unbiased(lambda: grads(q, [x]), want, k=256, keys=['input0'])
