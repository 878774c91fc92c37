"""ActNNHook and the `actnn=` config key, on a toy mmengine Runner (fast)."""

import pytest
import torch
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import actnn_mm
from actnn_mm.mm import ActNNHook, apply_actnn_key
from actnn_mm.mm.hooks.actnn_hook import _sample_indices
from test_layers.qchecks import settings


class ToyModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.frozen = nn.Conv2d(8, 8, 1)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 2)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = self.frozen(self.relu(self.bn(self.conv(torch.stack(inputs)))))
        logits = self.head(x.mean((2, 3)))
        if mode == 'loss':
            return {'loss': nn.functional.cross_entropy(logits, torch.stack(data_samples))}
        return logits


class ToyData(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 16, 16, generator=g), data_samples=torch.tensor(i % 2))


def toy_runner(tmp_path, actnn: bool = True, resume: bool = False, **hook) -> Runner:
    """3 iterations, a checkpoint after the last; with the ActNNHook (``hook``: its arguments)."""
    return Runner(
        model=ToyModel(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=4, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=3),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False)),
        custom_hooks=[dict(type='ActNNHook', **hook)] if actnn else [], default_scope='mmengine',
        resume=resume)


@pytest.fixture(autouse=True)
def restore_config():
    with settings('L3'):
        yield


def test_hook_converts_trains_and_logs(tmp_path):
    runner = toy_runner(tmp_path, level='L3')
    runner.train()
    model = runner.model
    assert type(model.conv).__name__ == 'QConv2d' and type(model.bn).__name__ == 'QBatchNorm2d'
    assert type(model.relu).__name__ == 'QReLU'
    assert not any(p.requires_grad for p in model.frozen.parameters())  # frozen stays frozen
    scalars = runner.message_hub.log_scalars
    assert scalars['train/actnn/avg_bits'].current() <= 2.0
    assert scalars['train/actnn/ratio'].current() > 4
    assert scalars['train/actnn/mib'].current() > 0


def test_validation_and_testing_stay_uncompressed(tmp_path):
    """Without gradients (mmengine's val/test loops run under no_grad) the converted layers run
    the plain ops: nothing is kept and the outputs equal the plain model's, bit for bit."""
    import copy

    from actnn_mm.layers.state import model_state

    runner = toy_runner(tmp_path, level='L3')
    runner.train()
    model = runner.model.eval()
    plain = actnn_mm.revert(copy.deepcopy(model))
    assert not any(type(m).__name__.startswith('Q') for m in plain.modules())
    inputs = [ToyData()[i]['inputs'] for i in range(4)]
    model_state(model).step_log.begin_step()
    with torch.no_grad():
        out = model(inputs)
        assert torch.equal(out, plain(inputs))
    assert actnn_mm.stats(model)['compressed_bytes'] == 0


def test_fixes_hold_while_the_run_goes_and_resume_works(tmp_path):
    """While the hook's run goes, the run's own checkpoints load under torch's weights_only
    default (resume) and mmcv's adjust_hue takes negative factors; before and after it, mmengine
    and mmcv are as they were, and a run without the hook cannot resume."""
    import mmcv
    from mmengine.hooks import Hook
    from mmengine.runner.checkpoint import CheckpointLoader

    def stack():
        return CheckpointLoader._schemes[''], mmcv.adjust_hue

    original, seen = stack(), []

    class Probe(Hook):
        def before_train(self, runner: Runner) -> None:
            seen.append(stack())

    runner = toy_runner(tmp_path, level='L3')
    runner.register_hook(Probe())
    runner.train()
    assert all(now is not then for now, then in zip(seen[0], original))
    assert stack() == original
    with pytest.raises(Exception, match='[Ww]eights only'):
        toy_runner(tmp_path, actnn=False, resume=True).train()
    assert stack() == original
    resumed = toy_runner(tmp_path, resume=True, level='L3')
    resumed.train()
    assert resumed.iter == 3 and stack() == original


class _ConvBNModel(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8).eval())
        self.head = nn.Linear(8, 2)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        logits = self.head(self.backbone(torch.stack(inputs)).mean((2, 3)))
        if mode == 'loss':
            return {'loss': nn.functional.cross_entropy(logits, torch.stack(data_samples))}
        return logits

    def train(self, mode: bool = True) -> '_ConvBNModel':
        super().train(mode)
        self.backbone[4].eval()  # as norm_eval=True keeps a detector's BatchNorms
        return self


@pytest.mark.parametrize('saver', ['efficient_conv_bn_eval', 'activation_checkpointing'])
def test_hook_after_mmengine_savers(tmp_path, saver):
    """The Runner applies its savers (fx tracing for efficient_conv_bn_eval) before the hook
    converts; training then runs with both."""
    runner = Runner(
        model=_ConvBNModel(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=4, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=2), default_hooks=dict(checkpoint=None),
        custom_hooks=[dict(type='ActNNHook', level='L3')], default_scope='mmengine',
        cfg=dict(**{saver: ['backbone']}))
    runner.train()
    assert type(runner.model.backbone[1]).__name__ == 'QBatchNorm2d'
    assert runner.message_hub.log_scalars['train/actnn/mib'].current() > 0


def test_hook_level_and_knobs(tmp_path):
    runner = toy_runner(tmp_path, level='L2', group_size=64)
    runner.train()
    assert actnn_mm.config.level == 'L2' and actnn_mm.config.group_size == 64
    assert runner.message_hub.log_scalars['train/actnn/avg_bits'].current() == 4.0


@pytest.mark.parametrize('kwargs,match', [(dict(level='L9'), 'unknown level'),
                                          (dict(level='L3', bitz=2), 'unknown settings')])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActNNHook(**kwargs)


def test_generic_default_follows_level():
    assert ActNNHook('L3').generic and ActNNHook('L5').generic
    assert not ActNNHook('L2').generic and not ActNNHook('L3', generic=False).generic


def test_sample_indices_from_data_samples():
    class Sample:
        def __init__(self, idx):
            self.metainfo = {} if idx is None else {'sample_idx': idx}

    assert _sample_indices({'data_samples': [Sample(3), Sample(7)]}) == [3, 7]
    assert _sample_indices({'data_samples': [Sample(3), Sample(None)]}) is None
    assert _sample_indices({'inputs': []}) is None


def test_actnn_key_becomes_hook_and_meta_keys():
    cfg = Config(dict(
        actnn=dict(level='L2'), custom_hooks=[dict(type='EMAHook')],
        train_dataloader=dict(dataset=dict(type='RepeatDataset', dataset=dict(pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='PackDetInputs', meta_keys=('img_id', 'img_shape'))])))))
    assert apply_actnn_key(cfg)
    assert cfg.custom_imports['imports'] == ['actnn_mm']
    assert [h['type'] for h in cfg.custom_hooks] == ['EMAHook', 'ActNNHook']
    assert cfg.custom_hooks[1]['level'] == 'L2'
    pack = cfg.train_dataloader.dataset.dataset.pipeline[1]
    assert pack['meta_keys'] == ('img_id', 'img_shape', 'sample_idx')
    assert not apply_actnn_key(Config(dict()))


@pytest.mark.parametrize('bad,match', [(dict(level='L7'), 'unknown level'), ('L3', 'must be a dict'),
                                       (dict(level='L3', group=8), 'unknown settings')])
def test_bad_actnn_key_fails_with_a_clear_message(bad, match):
    with pytest.raises(ValueError, match=match):
        apply_actnn_key(Config(dict(actnn=bad)))


def test_registry_names_build_actnn_layers():
    from mmcv.cnn import build_activation_layer, build_conv_layer, build_norm_layer

    name, bn = build_norm_layer(dict(type='QBN', requires_grad=True), 8)
    assert name == 'bn' and isinstance(bn, actnn_mm.QBatchNorm2d)
    assert isinstance(build_conv_layer(dict(type='QConv'), 3, 8, 3), actnn_mm.QConv2d)
    assert isinstance(build_activation_layer(dict(type='QReLU')), actnn_mm.QReLU)
    assert isinstance(build_norm_layer(dict(type='QSyncBN'), 8)[1], actnn_mm.QSyncBatchNorm)
    assert isinstance(build_norm_layer(dict(type='QLN'), 8)[1], actnn_mm.QLayerNorm)
