"""QGELU and QSiLU against torch: exact without compression, close at 8 bits and unbiased at 2
bits (they keep the derivative, in which the gradient is linear), in place or not."""
import pytest
import torch
from torch import nn

import actnn_mm
from qchecks import assert_close_grads, assert_unbiased, grads, settings

LAYERS = {
    'gelu': (lambda: nn.GELU(), actnn_mm.QGELU),
    'gelu-tanh': (lambda: nn.GELU(approximate='tanh'), actnn_mm.QGELU),
    'silu': (lambda: nn.SiLU(), actnn_mm.QSiLU),
    'silu-inplace': (lambda: nn.SiLU(inplace=True), actnn_mm.QSiLU),
}
TWO_BITS = dict(activation_compression_bits=[2], adaptive=False)  # L3 at a uniform 2 bits


class Chain(nn.Module):
    """The activation after an op, so that an in-place one acts on a non-leaf tensor."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x * 1.5)


def make(name, shape=(3, 4, 5, 7), dtype=torch.float32, channels_last=False, device='cpu'):
    build, cls = LAYERS[name]
    ref = build()
    q = build()
    q.__class__ = cls
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return Chain(ref), Chain(q), x.to(device)


@pytest.mark.parametrize('name', list(LAYERS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('level', ['L0', 'L1'])
def test_uncompressed_equals_torch(name, dtype, level, device):
    ref, q, x = make(name, dtype=dtype, device=device)
    with settings(level):
        assert_close_grads(grads(q, [x]), grads(ref, [x]), rtol=0)


@pytest.mark.parametrize('name', list(LAYERS))
def test_float64_stays_exact_when_compressing(name):
    ref, q, x = make(name, dtype=torch.float64)
    with settings('L3', **TWO_BITS):
        assert_close_grads(grads(q, [x]), grads(ref, [x]), rtol=0)


@pytest.mark.parametrize('name', list(LAYERS))
@pytest.mark.parametrize('channels_last', [False, True])
def test_8bit_close(name, channels_last, device):
    ref, q, x = make(name, channels_last=channels_last, device=device)
    want = grads(ref, [x])
    with settings('L2', activation_compression_bits=[8]):
        got = grads(q, [x])
    assert_close_grads(got, want, rtol=1e-2)
    assert torch.equal(got['out'], want['out'])
    assert not torch.equal(got['input0'], want['input0'])
    if channels_last:
        assert got['input0'].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('name', list(LAYERS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_2bit_unbiased(name, dtype, device):
    ref, q, x = make(name, shape=(4, 6, 16), dtype=dtype, device=device)
    want = grads(ref, [x])
    with settings('L3', **TWO_BITS):
        assert_unbiased(lambda: grads(q, [x]), want, k=128, keys=['input0'])


@pytest.mark.parametrize('name', ['gelu', 'silu'])
def test_keeps_two_bits_per_value(name):
    _, q, _ = make(name)
    x = torch.randn(4, 64, 32, requires_grad=True)
    with settings('L3', **TWO_BITS):
        q(x)
    assert q.act.actnn_full_bytes == x.nbytes
    assert x.nbytes / q.act.actnn_saved_bytes > 14


@pytest.mark.parametrize('level', ['L0', 'L3'])
def test_inplace_silu_modifies_its_input_and_guards_leaves(level):
    silu = actnn_mm.QSiLU(inplace=True)
    x = torch.randn(3, 8, requires_grad=True)
    y = x * 1
    expected = nn.functional.silu(y.detach())
    with settings(level):
        out = silu(y)
        assert out is y and torch.equal(y.detach(), expected)
        with pytest.raises(RuntimeError, match='leaf Variable that requires grad'):
            silu(x)


def test_no_grad_runs_plain_op():
    gelu = actnn_mm.QGELU()
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = gelu(x.requires_grad_())
    assert out.grad_fn is None and torch.equal(out, nn.functional.gelu(x))
    assert not hasattr(gelu, 'actnn_saved_bytes')


@pytest.mark.parametrize('level,converted', [('L1', False), ('L2', True)])
def test_qmodule_converts_keeping_options(level, converted):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate='tanh'), nn.SiLU(inplace=True))
    with settings(level):
        actnn_mm.QModule(model)
    assert (type(model[1]) is actnn_mm.QGELU) is converted
    assert (type(model[2]) is actnn_mm.QSiLU) is converted
    assert model[1].approximate == 'tanh' and model[2].inplace
    actnn_mm.revert(model)
    assert type(model[1]) is nn.GELU and type(model[2]) is nn.SiLU
