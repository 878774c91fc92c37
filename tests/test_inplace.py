"""BatchNorm layers fed only by a convolution normalize in place: which are marked, that the
in-place path computes what the copying path does, and that nobody who can see the
convolution's output (hooks, retain_grad, a caller of the layers) ever sees it overwritten."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import actnn_mm
from actnn_mm.inplace import mark_inplace_norms
from actnn_mm.layers import norm as norm_module
from actnn_mm.layers.norm import INPLACE_INPUT
from test_layers.qchecks import settings


pytestmark = pytest.mark.usefixtures('single_thread')


def marked(model: nn.Module):
    return {name for name, m in model.named_modules() if m.__dict__.get(INPLACE_INPUT)}


@pytest.fixture
def overwrites(monkeypatch):
    """The in-place decision of every training BatchNorm forward that keeps its normalized
    input compressed, in order (the list fills as they run)."""
    seen = []
    normalize = norm_module._normalize_then_affine

    def spy(*args):
        seen.append(args[-1])
        return normalize(*args)

    monkeypatch.setattr(norm_module, '_normalize_then_affine', spy)
    return seen


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
    from mmcv.cnn import ConvModule

    with settings('L3'):
        resnet = actnn_mm.convert(torchvision.models.resnet18())[0]
        assert len(marked(resnet)) == sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
        shared = nn.BatchNorm2d(4)
        module = actnn_mm.convert(nn.ModuleDict({
            'seq': nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            'conv_module': ConvModule(3, 4, 3, norm_cfg=dict(type='BN')),
            'act_first': ConvModule(3, 4, 3, norm_cfg=dict(type='BN'),
                                    order=('act', 'norm', 'conv')),
            'norm_last': ConvModule(3, 4, 3, norm_cfg=dict(type='BN'),
                                    order=('conv', 'act', 'norm')),
            'own_block': ConvBN(),
            'own_sequential': OwnSequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            'linear_bn': nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            # one norm in two places: the other place may show its input to anyone
            'shared_a': nn.Sequential(nn.Conv2d(3, 4, 3), shared),
            'shared_b': nn.Sequential(nn.Conv2d(3, 4, 3), shared)}))[0]
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


def train_step(model: nn.Module, x: torch.Tensor, seed: int = 1) -> list:
    """One forward and backward at 8 bits with seeded rounding: output, BN stats, gradients."""
    for p in model.parameters():
        p.grad = None
    with settings('L2', activation_compression_bits=[8]):
        actnn_mm.convert(model)
        torch.manual_seed(seed)  # the same stochastic rounding
        out = model(x)
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
    norm = model[1]
    return [out.detach(), norm.running_mean, norm.running_var,
            *(p.grad for p in model.parameters())]


@pytest.mark.parametrize('channels_last', [False, True])
def test_in_place_equals_the_copying_path(channels_last, overwrites):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 10, 10)
    if channels_last:  # not in place (contiguous inputs only), still correct
        ref, x = ref.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    in_place = train_step(copy.deepcopy(ref), x)
    hooked = copy.deepcopy(ref)
    hooked[0].register_forward_hook(lambda *args: None)  # someone could see the conv output
    copying = train_step(hooked, x)
    assert overwrites == [True, False]
    for got, want in zip(in_place, copying):
        assert torch.equal(got, want)


def conv_output(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s output on ``x``, recomputed by torch."""
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def converted_pair(level: str = 'L3') -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with settings(level):
        actnn_mm.convert(model)
    assert marked(model) == {'1'}
    return model


def test_not_in_place_when_the_input_is_not_a_convolution_output(overwrites):
    model = converted_pair()
    model[0].requires_grad_(False)  # the frozen conv runs the plain op
    with settings('L3'):
        model(torch.randn(2, 3, 7, 7)).sum().backward()
    assert overwrites == [False]


@pytest.mark.parametrize('where', ['conv forward', 'norm pre', 'norm forward', 'global forward',
                                   'global pre'])
def test_a_hook_added_after_conversion_sees_the_conv_output(where, overwrites):
    model = converted_pair()
    x = torch.randn(2, 3, 7, 7)
    seen = []
    if where == 'conv forward':
        handle = model[0].register_forward_hook(lambda m, args, out: seen.append(out))
    elif where == 'norm pre':
        handle = model[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    elif where == 'norm forward':  # sees the norm's input after the norm ran
        handle = model[1].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    elif where == 'global forward':
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: seen.append(out) if m is model[0] else None)
    else:
        handle = nn.modules.module.register_module_forward_pre_hook(
            lambda m, args: seen.append(args[0]) if m is model[1] else None)
    with settings('L3'):
        try:
            model(x).sum().backward()
        finally:
            handle.remove()
        assert torch.equal(seen[0], conv_output(model[0], x))
        model(x).sum().backward()  # hook gone: in place again
    assert overwrites == [False, True]


def test_a_caller_of_the_children_keeps_the_conv_output(overwrites):
    # code other than the structure's own (here, the test) may keep what it got
    model = converted_pair()
    x = torch.randn(2, 3, 7, 7)
    with settings('L3'):
        out = model[0](x)
        model[1](out).sum().backward()
    assert overwrites == [False]
    assert torch.equal(out, conv_output(model[0], x))


@pytest.mark.parametrize('by', ['caller', 'self-removing hook'])
def test_retain_grad_keeps_the_conv_output_and_its_gradient(by, overwrites):
    model = converted_pair('L2')
    ref = copy.deepcopy(model)
    actnn_mm.revert(ref)
    x = torch.randn(2, 3, 7, 7)
    weight = torch.randn(2, 8, 5, 5)
    with settings('L2', activation_compression_bits=[8]):
        if by == 'caller':
            out = model[0](x)
            out.retain_grad()
            model[1](out).mul(weight).sum().backward()
        else:  # retain_grad on the conv output, then the hook is gone when the norm runs
            kept = []

            def once(module, args, output):
                output.retain_grad()
                kept.append(output)
                handle.remove()

            handle = model[0].register_forward_hook(once)
            model(x).mul(weight).sum().backward()
            out = kept[0]
    assert overwrites == [False]
    want = ref[0](x)
    want.retain_grad()
    ref[1](want).mul(weight).sum().backward()
    assert torch.equal(out, want)
    torch.testing.assert_close(out.grad, want.grad, rtol=0.05, atol=0.05)


def test_resnet50_hooked_conv_sees_its_output_and_training_matches(overwrites):
    """A feature tap on a ResNet-50 convolution (registered after conversion) at L3 sees the
    convolution's output, and the training is the same as without it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 3])
    with settings('L3'):
        actnn_mm.convert(model)
    hooked = copy.deepcopy(model)
    tapped = hooked.layer2[0].conv2
    taps = []
    tapped.register_forward_hook(lambda m, args, out: taps.append((args[0].clone(), out)))

    def train(net):  # the deep copy's layers share a new allocator
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        losses = []
        with settings('L3'):
            for step in range(2):
                opt.zero_grad()
                torch.manual_seed(step)
                loss = F.cross_entropy(net(x), labels)
                loss.backward()
                if net is hooked:  # before the step changes the weight
                    tap_input, tap_output = taps[-1]
                    assert torch.equal(tap_output, conv_output(tapped, tap_input))
                opt.step()
                losses.append(loss.item())
        return losses, net.state_dict()

    want_losses, want = train(model)
    in_place = overwrites.count(True)
    del overwrites[:]
    got_losses, got = train(hooked)
    assert len(taps) == 2
    assert overwrites.count(True) == in_place - 2  # the tapped conv's norm alone, each step
    assert in_place == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert got_losses == want_losses
    for key, value in want.items():
        assert torch.equal(got[key], value), key
