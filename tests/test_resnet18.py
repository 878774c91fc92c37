"""A whole torchvision resnet18 converted: keys, training, unbiased gradients, activation memory."""
import copy

import pytest
import torch
import torchvision

import actnn_mm
from actnn_mm.layers import held_bytes
from test_layers.qchecks import assert_unbiased, settings


pytestmark = pytest.mark.usefixtures('single_thread')


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def saved_activation_bytes(model, x):
    """Bytes kept for backward by one training forward: unique storages autograd saves (except
    parameters) plus what the ActNN layers hold outside autograd."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    before = held_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), held_bytes() - before, out


def test_conversion_keeps_keys_and_converts_every_layer():
    model = resnet18()
    keys = list(model.state_dict())
    with settings('L3'):
        _, summary = actnn_mm.convert(model)
    assert list(model.state_dict()) == keys
    assert summary.converted == {'Conv2d': 20, 'BatchNorm2d': 20, 'ReLU': 9, 'MaxPool2d': 1,
                                 'Linear': 1}
    assert not summary.skipped


@pytest.mark.parametrize('level,factor', [('L3', 13), ('L2', 8)])  # issue: 12x, 6x
def test_activation_memory_reduction(level, factor):
    model = resnet18()
    x = torch.randn(2, 3, 128, 128)
    full, _, _ = saved_activation_bytes(model, x)
    with settings(level):
        actnn_mm.convert(model)  # QModule would also observe this first step (own saved hooks)
        held_before = held_bytes()
        autograd_kept, layers_kept, out = saved_activation_bytes(model, x)
        bn_stats = sum(2 * 4 * m.num_features for m in model.modules()
                       if isinstance(m, torch.nn.BatchNorm2d))
        assert autograd_kept == bn_stats  # autograd keeps only BN's per-channel mean, invstd
        assert layers_kept > 0 and full / (autograd_kept + layers_kept) >= factor
        out.sum().backward()
    assert held_bytes() == held_before  # backward released every compressed copy
    assert all(p.grad is not None for p in model.parameters())


def test_gradients_unbiased_at_2_bits():
    model = resnet18()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64)
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(7))
    exact = ('fc.bias', 'layer4.1.bn2.bias')  # nothing compressed on their gradients' path
    keys = [name for name, p in model.named_parameters()  # every BN, a conv of each stage
            if name not in exact and (p.dim() == 1 or name.endswith(('conv1.weight', 'fc.weight',
                                                                      'downsample.0.weight')))]

    def grads(m):
        m.zero_grad()
        (m(x) * weight).sum().backward()
        return {name: p.grad.clone() for name, p in m.named_parameters() if name in keys}

    want = grads(ref)
    with settings('L3'):
        actnn_mm.QModule(model)
        assert_unbiased(lambda: grads(model), want, k=48, keys=keys)


def test_optimizer_built_before_conversion_trains():
    model = resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8) % 10
    losses = []
    with settings('L3'):
        actnn_mm.QModule(model)
        for _ in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_autocast_bf16_gradients_close_at_8_bits():
    model = resnet18()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64)
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (ref(x).float() * weight).sum().backward()
        with settings('L2', activation_compression_bits=[8]):
            actnn_mm.QModule(model)
            out = model(x)
            (out.float() * weight).sum().backward()
    assert out.dtype == torch.bfloat16
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, name
        assert (p.grad - q.grad).norm() <= 4e-2 * q.grad.norm(), name
