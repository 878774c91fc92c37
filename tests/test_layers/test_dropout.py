"""QDropout: a 1-bit packed mask, gradients exactly those of its own mask."""
import pytest
import torch

import actnn_mm
from qchecks import grads, settings


@pytest.mark.parametrize('inplace', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True])
def test_gradient_is_mask_times_scale(inplace, dtype, channels_last, device):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=dtype) + 5  # nowhere 0, so out == 0 only where dropped
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(device)
    p = 0.3
    drop = actnn_mm.QDropout(p, inplace)
    with settings('L3'):
        g = grads(torch.nn.Sequential(torch.nn.Identity(), drop) if not inplace else
                  _NonLeaf(drop), [x])
    kept = g['out'] != 0
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(device)
    torch.testing.assert_close(g['out'], torch.where(kept, x / (1 - p), torch.zeros_like(x)))
    torch.testing.assert_close(g['input0'], torch.where(kept, (weight / (1 - p)).to(dtype),
                                                        torch.zeros_like(x)))
    assert abs(kept.double().mean() - (1 - p)) < 0.1
    assert drop.actnn_saved_bytes == x.numel() // 8


class _NonLeaf(torch.nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.drop = drop

    def forward(self, x):
        return self.drop(x * 1)


def test_same_mask_as_torch_for_the_same_seed(device):
    x = torch.randn(64, 32).to(device)
    torch.manual_seed(3)
    want = torch.nn.functional.dropout(x, 0.5)
    torch.manual_seed(3)
    with settings('L3'):
        got = actnn_mm.QDropout(0.5)(x.requires_grad_())
    assert torch.equal(got.detach(), want)


def test_eval_p0_and_no_grad_are_plain():
    x = torch.randn(8, 8, requires_grad=True)
    drop = actnn_mm.QDropout(0.5)
    drop.eval()
    assert drop(x) is x
    drop.train()
    with torch.no_grad():
        assert drop(x).grad_fn is None
    zero = actnn_mm.QDropout(0.0)
    assert torch.equal(zero(x), x)
    assert not hasattr(drop, 'actnn_saved_bytes') and not hasattr(zero, 'actnn_saved_bytes')


def test_p1_drops_everything():
    x = torch.randn(8, 8, requires_grad=True)
    out = actnn_mm.QDropout(1.0)(x * 1)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(x.grad, torch.zeros_like(x))
