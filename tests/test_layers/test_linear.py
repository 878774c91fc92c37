"""QLinear against torch: exact at L0, close at 8 bits, unbiased at 2 bits, any leading dims."""
import copy

import pytest
import torch
from torch import nn

import actnn_mm
from qchecks import assert_close_grads, assert_unbiased, grads, settings, spy_quantize

SHAPES = {'2d': (6, 5), '3d': (3, 4, 5), '4d': (2, 3, 2, 5), 'unbatched': (5,)}


def make(shape, bias=True, dtype=torch.float32, device='cpu'):
    """(torch layer, the same converted, input), made on the CPU (the same values on every
    device), then moved to ``device``."""
    torch.manual_seed(0)
    ref = nn.Linear(5, 7, bias=bias).to(device, dtype)
    q = copy.deepcopy(ref)
    q.__class__ = actnn_mm.QLinear
    return ref, q, torch.randn(SHAPES[shape], dtype=dtype).to(device)


@pytest.mark.parametrize('shape', list(SHAPES))
@pytest.mark.parametrize('bias', [True, False])
def test_l0_equals_torch(shape, bias, device):
    ref, q, x = make(shape, bias, device=device)
    with settings('L0'):
        got = grads(q, [x])
    assert_close_grads(got, grads(ref, [x]), rtol=1e-6)


@pytest.mark.parametrize('shape', list(SHAPES))
def test_8bit_close(shape, device):
    ref, q, x = make(shape, device=device)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    assert_close_grads(got, want, rtol=2e-2)
    assert_close_grads({'input0': got['input0'], 'bias': got['bias']},
                       {'input0': want['input0'], 'bias': want['bias']}, rtol=1e-6)


@pytest.mark.parametrize('shape', ['2d', '3d'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_2bit_unbiased(shape, dtype, device):
    ref, q, x = make(shape, dtype=dtype, device=device)
    want = grads(ref, [x])
    with settings('L3'):
        assert_unbiased(lambda: grads(q, [x]), want, k=128, keys=['weight'])


def test_autocast_bf16(monkeypatch):
    ref, q, x = make('3d')
    seen = spy_quantize(monkeypatch)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        want = grads(ref, [x])
        with settings('L0'):
            exact = grads(q, [x])
        with settings('L3'):
            assert_unbiased(lambda: grads(q, [x]), want, k=48, keys=['weight'])
    assert seen and set(seen) == {torch.bfloat16}
    assert exact['out'].dtype == torch.bfloat16 and exact['weight'].dtype == torch.float32
    assert_close_grads(exact, want, rtol=1e-6)


def test_frozen_and_no_grad_skip_compression(monkeypatch):
    calls = spy_quantize(monkeypatch)
    ref, q, x = make('3d')
    with settings('L3'):
        with torch.no_grad():
            assert torch.equal(q(x), ref(x))
        q.weight.requires_grad_(False)
        got = grads(q, [x])
    assert not calls
    ref.weight.requires_grad_(False)
    assert_close_grads(got, grads(ref, [x]), rtol=1e-6)


def test_output_of_batched_input_can_change_in_place():
    """An FFN's linear followed by an inplace ReLU (mmcv FFN, DETR): the output is no view."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(inplace=True))
    ref = copy.deepcopy(model)
    actnn_mm.QModule(model)
    x = torch.randn(2, 5, 8)
    with settings('L2', activation_compression_bits=[8]):
        assert_close_grads(grads(model, [x]), grads(ref, [x]), rtol=3e-2)
