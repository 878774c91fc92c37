"""QReLU: exact gradients from a 1-bit mask, in place or not, any layout and dtype."""
import pytest
import torch
from torch import nn

import actnn_mm
from qchecks import assert_close_grads, grads, settings


def make_input(shape=(3, 4, 5, 7), dtype=torch.float32, channels_last=False, device='cpu'):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    x.view(-1)[:3] = 0  # the kink: torch's gradient is 0 there
    return (x.to(memory_format=torch.channels_last) if channels_last else x).to(device)


class Chain(nn.Module):
    """ReLU after an op, so that an in-place ReLU acts on a non-leaf tensor."""

    def __init__(self, relu):
        super().__init__()
        self.relu = relu

    def forward(self, x):
        return self.relu(x * 1.5)


@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('level', ['L0', 'L3'])
def test_exact_gradients(inplace, dtype, channels_last, level, device):
    x = make_input(dtype=dtype, channels_last=channels_last, device=device)
    with settings(level):
        got = grads(Chain(actnn_mm.QReLU(inplace)), [x])
    want = grads(Chain(nn.ReLU(inplace)), [x])
    assert_close_grads(got, want, rtol=0)
    if channels_last:
        assert got['input0'].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('shape', [(5,), (3, 1), (2, 3, 5), (1, 1, 1, 1, 3)])
def test_odd_sizes(shape, device):
    x = make_input(shape, device=device)
    with settings('L3'):
        assert_close_grads(grads(actnn_mm.QReLU(), [x]), grads(nn.ReLU(), [x]), rtol=0)


def test_keeps_one_bit_per_element():
    relu = actnn_mm.QReLU()
    x = make_input((2, 8, 10, 10))
    with settings('L3'):
        out = relu(x.requires_grad_())
    assert relu.actnn_saved_bytes == x.numel() // 8
    assert relu.actnn_full_bytes == out.nbytes


def test_inplace_modifies_input_and_guards_leaves():
    relu = actnn_mm.QReLU(inplace=True)
    x = make_input().requires_grad_()
    y = x * 1
    out = relu(y)
    assert out is y and bool((y >= 0).all())
    with pytest.raises(RuntimeError, match='leaf Variable that requires grad'):
        relu(x)


def test_no_grad_runs_plain_relu():
    relu = actnn_mm.QReLU()
    x = make_input()
    with torch.no_grad():
        out = relu(x.requires_grad_())
    assert out.grad_fn is None and torch.equal(out, torch.relu(x))
    assert not hasattr(relu, 'actnn_saved_bytes')
