"""BatchNorm layers fed only by a convolution normalize in place: which are marked, and that the
in-place path computes what the copying path does."""
import copy

import pytest
import torch
import torchvision
from mmcv.cnn import ConvModule
from torch import nn

import actnn_mm
from actnn_mm.inplace import mark_inplace_norms
from actnn_mm.layers.norm import INPLACE_INPUT
from test_layers.qchecks import settings


def marked(model: nn.Module):
    return {name for name, m in model.named_modules() if m.__dict__.get(INPLACE_INPUT)}


class ConvBN(nn.Module):
    """A block of its own: its forward may read the conv output twice, so it is not marked."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.conv1(x)
        return self.norm1(out) + out


class OwnSequential(nn.Sequential):
    def forward(self, x):
        out = self[0](x)
        return self[1](out) + out


def test_marks_the_structures_known_to_feed_the_norm_alone():
    with settings('L3'):
        resnet = actnn_mm.convert(torchvision.models.resnet18())[0]
        assert len(marked(resnet)) == sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
        module = actnn_mm.convert(nn.ModuleDict({
            'seq': nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            'conv_module': ConvModule(3, 4, 3, norm_cfg=dict(type='BN')),
            'act_first': ConvModule(3, 4, 3, norm_cfg=dict(type='BN'),
                                    order=('act', 'norm', 'conv')),
            'norm_last': ConvModule(3, 4, 3, norm_cfg=dict(type='BN'),
                                    order=('conv', 'act', 'norm')),
            'own_block': ConvBN(),
            'own_sequential': OwnSequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            'linear_bn': nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))}))[0]
    assert marked(module) == {'seq.2', 'conv_module.bn'}
    actnn_mm.revert(module)
    assert not marked(module)


def test_reconversion_unmarks_a_norm_no_longer_fed_by_an_activation_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with settings('L3'):
        actnn_mm.convert(model)
    assert marked(model) == {'1'}
    model[0] = nn.Identity()
    assert mark_inplace_norms(model) == [] and not marked(model)


@pytest.mark.parametrize('channels_last', [False, True])
def test_in_place_equals_the_copying_path(channels_last):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 10, 10)
    if channels_last:  # not in place (contiguous inputs only), still correct
        ref, x = ref.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    results = []
    for inplace in (True, False):
        model = copy.deepcopy(ref)
        with settings('L2', activation_compression_bits=[8]):
            actnn_mm.convert(model)
            if not inplace:
                model[1].__dict__.pop(INPLACE_INPUT)
            torch.manual_seed(1)  # the same stochastic rounding
            conv_out = model[0](x)
            normalized = model[1](conv_out)
            out = model[2](normalized)
            (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        assert (conv_out.data_ptr() == normalized.data_ptr()) == (inplace and not channels_last)
        results.append([out.detach(), model[1].running_mean, model[1].running_var,
                        *(p.grad for p in model.parameters())])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_not_in_place_when_the_input_is_not_a_convolution_output():
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with settings('L3'):
        actnn_mm.convert(norm)
        x = torch.randn(2, 4, 5, 5, requires_grad=True) * 1
        before = x.detach().clone()
        norm[1](x).sum().backward()
    assert torch.equal(x.detach(), before)
