"""QModule / convert / revert: in-place class swap, levels, skips with reasons, DDP, checkpoints."""
import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

import actnn_mm
from actnn_mm import convert, revert
from test_layers.qchecks import settings


class WSConv2d(nn.Conv2d):
    """A subclass with its own forward (weight standardisation): must not be converted."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def net(sync_bn=True):
    """A model with every supported layer, a subclass and an unsupported layer (dropout p=0 so
    that outputs are comparable: quantization draws from torch's generator)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.0), nn.Identity(),
        nn.ConvTranspose2d(8, 8, 2, stride=2, bias=False),
        nn.SyncBatchNorm(8) if sync_bn else nn.BatchNorm2d(8), nn.ReLU(),
        WSConv2d(8, 4, 3), nn.PReLU(4), nn.MaxPool2d(2, return_indices=False),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 5))


def test_converts_in_place_keeping_parameters_buffers_and_keys():
    model = net()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    keys = list(model.state_dict())
    with settings('L3'):
        out, summary = convert(model)
    assert out is model
    assert type(model[0]) is actnn_mm.QConv2d and type(model[1]) is actnn_mm.QBatchNorm2d
    assert type(model[2]) is actnn_mm.QReLU and model[2].inplace
    assert type(model[3]) is actnn_mm.QMaxPool2d and type(model[4]) is actnn_mm.QDropout
    assert type(model[6]) is actnn_mm.QConvTranspose2d
    assert type(model[7]) is actnn_mm.QSyncBatchNorm and type(model[13]) is actnn_mm.QLinear
    assert type(model[9]) is WSConv2d and type(model[10]) is nn.PReLU
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == keys
    assert summary.converted == {'Conv2d': 1, 'BatchNorm2d': 1, 'ReLU': 2, 'MaxPool2d': 2,
                                 'Dropout': 1, 'ConvTranspose2d': 1, 'SyncBatchNorm': 1,
                                 'Linear': 1}
    reasons = {cls: reason for _, cls, reason in summary.skipped}
    assert reasons.keys() == {'WSConv2d', 'PReLU'}
    assert 'subclass of Conv2d' in reasons['WSConv2d']
    assert 'no ActNN layer' in reasons['PReLU']


def test_outputs_and_gradients_match_at_8_bits_and_revert_restores():
    model = net()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    with settings('L2', activation_compression_bits=[8]):
        actnn_mm.QModule(model)
        torch.manual_seed(1)
        out = model(x)
        out.sum().backward()
    torch.manual_seed(1)
    want = ref(x)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= 3e-2 * q.grad.norm() + 1e-7, name
    assert revert(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert not any(hasattr(m, 'actnn_saved_bytes') for m in model.modules())
    torch.testing.assert_close(model(x), ref(x))


@pytest.mark.parametrize('level,converted', [
    ('L0', set()),
    ('L1', {'Conv2d', 'ConvTranspose2d', 'ReLU', 'MaxPool2d', 'Dropout'}),  # + lossless ones
    ('L2', {'Conv2d', 'ConvTranspose2d', 'BatchNorm2d', 'SyncBatchNorm', 'ReLU', 'MaxPool2d',
            'Dropout', 'Linear'}),
])
def test_level_decides_what_is_converted(level, converted):
    model = net()
    with settings(level):
        _, summary = convert(model)
    assert set(summary.converted) == converted
    by_level = {cls for _, cls, reason in summary.skipped if f'level {level}' in reason}
    assert by_level | converted == {'Conv2d', 'ConvTranspose2d', 'BatchNorm2d', 'SyncBatchNorm',
                                    'ReLU', 'MaxPool2d', 'Dropout', 'Linear'}


def test_unsupported_option_is_skipped_with_reason(caplog):
    model = nn.Sequential(nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d(2))
    with settings('L3'), caplog.at_level(logging.INFO, logger='actnn_mm'):
        actnn_mm.QModule(model)
    assert type(model[0]) is nn.MaxPool2d and type(model[1]) is actnn_mm.QMaxPool2d
    assert 'return_indices=True is not supported' in caplog.text
    assert 'converted 1 MaxPool2d' in caplog.text


def test_converting_twice_is_a_no_op():
    model = net()
    with settings('L3'):
        _, first = convert(model)
        classes = [type(m) for m in model.modules()]
        _, second = convert(model)
    assert [type(m) for m in model.modules()] == classes
    assert not second.converted and not second.skipped[len(first.skipped):]
    assert sum(second.already.values()) == sum(first.converted.values())


def test_optimizer_built_before_conversion_still_trains():
    model = net()
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(2, 3, 12, 12)
    with settings('L2', activation_compression_bits=[8]):
        actnn_mm.QModule(model)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), start.parameters()):
        step, ref_step = p - p0, q - p0
        assert ref_step.norm() > 0, name
        assert (step - ref_step).norm() <= 3e-2 * ref_step.norm(), name


def test_checkpoints_load_both_ways():
    plain, converted = net(), net()
    with settings('L3'):
        actnn_mm.QModule(converted)
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1)
    plain.load_state_dict(converted.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 converted.state_dict().values()))
    fresh = net()
    converted.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 converted.state_dict().values()))


def test_hooks_survive_conversion():
    model = net()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(type(m)))
    with settings('L3'):
        actnn_mm.QModule(model)
        model(torch.randn(1, 3, 12, 12, requires_grad=True))
    assert calls == [actnn_mm.QConv2d]


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group for the test."""
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _ddp_step_matches(model, ref, x, wrap_first):
    """Convert ``model`` (inside DDP if ``wrap_first``), one DDP step; gradients close to
    ``ref``'s (already computed)."""
    with settings('L2', activation_compression_bits=[8]):
        if wrap_first:
            ddp = nn.parallel.DistributedDataParallel(model)
            assert actnn_mm.QModule(ddp) is ddp
        else:
            ddp = nn.parallel.DistributedDataParallel(actnn_mm.QModule(model))
        assert type(ddp.module[0]) is actnn_mm.QConv2d
        ddp(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= 3e-2 * q.grad.norm() + 1e-7, name
    assert list(ddp.module.state_dict()) == list(ref.state_dict())


def test_conversion_inside_ddp(process_group):
    model = net(sync_bn=False)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    ref(x).sum().backward()
    _ddp_step_matches(model, ref, x, wrap_first=True)


def test_converted_sync_bn_is_accepted_by_cpu_ddp(tmp_path):
    model = net()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    ref(x).sum().backward()  # before the process group: torch's SyncBatchNorm refuses the CPU
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0,
                            world_size=1)
    try:
        with pytest.raises(ValueError, match='SyncBatchNorm layers only work with GPU'):
            nn.parallel.DistributedDataParallel(copy.deepcopy(ref))
        _ddp_step_matches(model, ref, x, wrap_first=False)
        assert type(model[7]) is actnn_mm.QSyncBatchNorm
    finally:
        dist.destroy_process_group()


def test_summary_text_groups_skips():
    model = nn.Sequential(*[nn.PReLU() for _ in range(5)], nn.Linear(4, 4))
    with settings('L3'):
        _, summary = convert(model)
    text = str(summary)
    assert 'converted 1 Linear' in text
    assert 'skipped 5 PReLU (0, 1, 2, ...): no ActNN layer' in text


def _reverted_sync_bn() -> nn.Module:
    from mmengine.model import revert_sync_batchnorm
    return revert_sync_batchnorm(net())  # what mmengine's Runner does in one process


def _mmcv_wrappers() -> nn.Module:
    from mmcv.cnn.bricks import wrappers
    torch.manual_seed(0)
    return nn.Sequential(wrappers.Conv2d(3, 4, 3), wrappers.MaxPool2d(2), nn.Flatten(),
                         wrappers.Linear(4 * 5 * 5, 6),
                         nn.modules.linear.NonDynamicallyQuantizableLinear(6, 2))


@pytest.mark.parametrize('build,converted', [
    (_reverted_sync_bn, {'_BatchNormXd': 1}),
    (_mmcv_wrappers, {'Conv2d': 1, 'MaxPool2d': 1, 'Linear': 1,
                      'NonDynamicallyQuantizableLinear': 1})])
def test_equivalent_classes_are_converted_and_restored(build, converted):
    """Classes computing what a torch base computes without subclassing it are converted like
    it: mmengine's ``_BatchNormXd`` (SyncBatchNorm reverted by a single-process Runner; left
    plain, generic mode would round its input, which its backward normalizes with the exact
    statistics, amplifying the error by 1/std) becomes QSyncBatchNorm; mmcv's Conv2d / Linear /
    MaxPool2d wrappers (every mmcv FFN, SegFormer's convs) and torch's
    NonDynamicallyQuantizableLinear become QConv2d, QLinear, QMaxPool2d. Gradients at 8 bits
    stay close and revert restores the original classes."""
    model = build()
    classes = [type(m) for m in model.modules()]
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12)
    with settings('L2', activation_compression_bits=[8]):
        _, summary = convert(model)
        model(x).sum().backward()
    ref(x).sum().backward()
    assert {k: summary.converted[k] for k in converted} == converted
    assert not any(cls in (c for _, c, _ in summary.skipped) for cls in converted)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= 3e-2 * q.grad.norm() + 1e-7, name
    revert(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any(hasattr(m, 'process_group') for m in model.modules()
                   if 'Norm' not in type(m).__name__)  # set for QSyncBatchNorm only
