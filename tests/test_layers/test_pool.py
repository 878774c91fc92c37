"""QMaxPool2d: exact gradients from window-relative argmax offsets, every pooling option."""
import itertools

import pytest
import torch
from torch import nn

import actnn_mm
from qchecks import assert_close_grads, grads, settings

OPTIONS = [dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=c)
           for k, s, p, d, c in itertools.product([2, 3, (3, 2)], [None, 1, (2, 1)], [0, 1],
                                                  [1, 2], [False, True])
           if max(k if isinstance(k, tuple) else (k,)) >= 2 * p]  # torch: pad <= kernel / 2


def make_input(shape=(2, 3, 11, 10), dtype=torch.float32, channels_last=False, ties=False,
               device='cpu'):
    torch.manual_seed(0)
    x = torch.randint(0, 3, shape).to(dtype) if ties else torch.randn(shape, dtype=dtype)
    return (x.to(memory_format=torch.channels_last) if channels_last else x).to(device)


def check(options, x, bits=None):
    q = actnn_mm.QMaxPool2d(**options)
    with settings('L3'):
        got = grads(q, [x])
    assert_close_grads(got, grads(nn.MaxPool2d(**options), [x]), rtol=0)
    return q


@pytest.mark.parametrize('options', OPTIONS, ids=[str(sorted(o.values(), key=str))
                                                  for o in OPTIONS])
def test_exact_gradients(options, device):
    check(options, make_input(device=device))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('ties', [False, True])
def test_dtypes_layouts_ties(dtype, channels_last, ties, device):
    x = make_input(dtype=dtype, channels_last=channels_last, ties=ties, device=device)
    check(dict(kernel_size=3, stride=2, padding=1), x)


def test_unbatched_and_negative_infinity(device):
    x = make_input((3, 9, 9), device=device)
    x[0, :4, :4] = float('-inf')
    check(dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), x)


@pytest.mark.parametrize('kernel,bits', [(3, 4), (4, 4), (5, 8), (16, 8), (17, 32)])
def test_offsets_take_4_bits_up_to_16_positions(kernel, bits):
    x = make_input((2, 4, 34, 34))
    q = check(dict(kernel_size=kernel, stride=1), x)
    out_elements = 2 * 4 * (35 - kernel) ** 2
    assert q.actnn_saved_bytes == -(-out_elements * bits // 8)
    assert q.actnn_full_bytes == x.nbytes + out_elements * 8


def test_return_indices_unsupported():
    q = actnn_mm.QMaxPool2d(2, return_indices=True)
    with pytest.raises(ValueError, match='return_indices'):
        q(torch.randn(1, 1, 4, 4, requires_grad=True))
    out, indices = q(torch.randn(1, 1, 4, 4))  # nothing to save: torch's op
    assert indices.dtype == torch.int64


@pytest.mark.parametrize('options', [dict(kernel_size=3, stride=2, padding=1),
                                     dict(kernel_size=(3, 2), stride=(2, 1), dilation=2,
                                          ceil_mode=True)])
def test_channels_last_gradient_of_an_nchw_input(options):
    # as a CPU convolution's backward hands it: the backward works in the gradient's layout
    x = make_input((2, 5, 13, 12)).requires_grad_()
    layouts = []
    y = x * 1  # not a leaf, whose .grad autograd would lay out as the leaf
    y.register_hook(lambda g: layouts.append(g.is_contiguous(memory_format=torch.channels_last)))
    with settings('L3'):
        out = actnn_mm.QMaxPool2d(**options)(y)
    grad = torch.randn(out.shape).contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    ref = x.detach().requires_grad_()
    nn.MaxPool2d(**options)(ref).backward(grad)
    assert torch.equal(x.grad, ref.grad) and layouts == [True]
