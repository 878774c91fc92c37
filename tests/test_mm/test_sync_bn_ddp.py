"""SyncBN configs with the `actnn=` key: in CPU processes (tools/dist_train.sh, gloo) the layers
are built as QSyncBatchNorm, which DDP accepts on the CPU, unlike torch's SyncBatchNorm; they
compress, synchronise and match one process on the combined batch, where the ActNNHook converts
the BatchNorms mmengine's Runner reverted them to. The conversion of mmcv's SyncBN, and the CPU
DDP wrapper's config."""
import contextlib
import functools
import re
import socket

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model.utils import revert_sync_batchnorm
from mmengine.registry import MODELS, DefaultScope
from torch import nn

import actnn_mm
from actnn_mm.mm import apply_actnn_key, setup_cpu_distributed
from test_layers.qchecks import settings
from test_mm.test_presets import train_scalars
from test_mm.test_train import DUMP_HOOK, _assert_identical, train, write

UPSTREAM = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'  # SyncBN in all its norms
# The upstream config shrunk to ResNet-18 widths at 64 x 64 px, 2 iterations, no pretrained
# weights, nothing random but the initialisation (same seed in every run): no dropout, no
# shuffling, no random crop or flip. Each of `world` processes reads every `world`-th image.
SEG_CONFIG = """
_base_ = '{upstream}'
crop_size = (64, 64)
model = dict(pretrained=None, data_preprocessor=dict(size=crop_size), backbone=dict(depth=18),
             decode_head=dict(in_channels=512, channels=32, dropout_ratio=0),
             auxiliary_head=dict(in_channels=256, channels=16, dropout_ratio=0))
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                  dict(type='Resize', scale=crop_size, keep_ratio=False),
                  dict(type='PackSegInputs')]
train_dataloader = dict(batch_size={batch}, num_workers=0, persistent_workers=False,
                        sampler=dict(type='InfiniteSampler', shuffle=False),
                        dataset=dict(data_root='{data}/cityscapes/', pipeline=train_pipeline))
val_dataloader = None
val_cfg = None
val_evaluator = None
train_cfg = dict(max_iters=2, val_interval=100)
randomness = dict(seed=0)
default_hooks = dict(logger=dict(interval=1), checkpoint={checkpoint})
actnn = {actnn}
"""
# Weights after each iteration (for the size of an update)
EVERY_ITER = 'dict(interval=1, save_optimizer=False, save_param_scheduler=False)'
# The ActNNHook's summary: SyncBN built as QSyncBatchNorm (CPU processes), or reverted by
# mmengine's Runner to _BatchNormXd and converted (one process)
BUILT = r'already converted: [^\n]*?(\d+) QSyncBatchNorm'
CONVERTED = r'converted [^\n]*?(\d+) _BatchNormXd'


@contextlib.contextmanager
def _launched(monkeypatch):
    """As a process that torchrun started alone: RANK, ... set; the process group is destroyed
    at exit if one was started."""
    for name, value in dict(RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1').items():
        monkeypatch.setenv(name, value)
    with socket.socket() as free:
        free.bind(('127.0.0.1', 0))
        monkeypatch.setenv('MASTER_PORT', str(free.getsockname()[1]))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _config(actnn):
    cfg = Config.fromstring(SEG_CONFIG.format(upstream=UPSTREAM, batch=2, data='', actnn=actnn,
                                              checkpoint=None), '.py')
    apply_actnn_key(cfg)
    return cfg


def _build(cfg):
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg.model)


@functools.lru_cache(maxsize=None)
def _upstream_sync_bns():
    """The number of SyncBatchNorm layers of the shrunk upstream model."""
    return sum(isinstance(m, nn.SyncBatchNorm) for m in _build(_config(None)).modules())


def _run(tmp_path, demo_data, name, actnn, world, batch, checkpoint=None):
    """Train the shrunk config in ``world`` processes of ``batch`` images each (0: one
    process, not distributed); returns the log, each rank's final state dict and the work dir."""
    out = tmp_path / name
    weights = out / 'weights'
    weights.mkdir(parents=True)
    text = SEG_CONFIG.format(upstream=UPSTREAM, batch=batch, data=demo_data, actnn=actnn,
                             checkpoint=checkpoint)
    config = write(out / 'seg.py', text + DUMP_HOOK.format(out=weights))
    log = train(config, out / 'work', dist=world)
    states = [torch.load(path) for path in sorted(weights.glob('rank*.pth'))]
    assert len(states) == max(world, 1), log[-3000:]
    return log, states, out / 'work'


def _assert_norms_compressed(log, level, summary):
    """The ActNNHook's summary: every SyncBN of the config is a QSyncBatchNorm, as ``summary``
    (a regular expression) says, and none is left uncompressed."""
    assert f'actnn_mm ({level}): converted' in log, log[-3000:]
    found = re.search(summary, log)
    assert found and int(found.group(1)) == _upstream_sync_bns(), log[-3000:]
    assert not re.search(r'skipped [^\n]*(SyncBatchNorm|BatchNormXd)', log), log[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU processes only')
def test_cpu_processes_build_sync_bn_as_qsync_bn_with_the_hook(monkeypatch):
    with _launched(monkeypatch):
        cfg = _config("dict(level='L3')")
        assert setup_cpu_distributed(cfg)
    assert cfg.model.backbone.norm_cfg == dict(type='QSyncBN', requires_grad=True)
    assert cfg.model.decode_head.norm_cfg.type == cfg.model.auxiliary_head.norm_cfg.type == \
        'QSyncBN'
    model = _build(cfg)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, actnn_mm.QSyncBatchNorm)]
    assert len(norms) == _upstream_sync_bns() > 20
    # mmengine's Runner in one process reverts torch's SyncBatchNorm only
    assert revert_sync_batchnorm(model) is model
    assert all(type(m) is actnn_mm.QSyncBatchNorm for m in norms)
    with _launched(monkeypatch):  # without ActNN, a SyncBN config keeps torch's layers
        cfg = _config(None)
        assert setup_cpu_distributed(cfg)
    assert cfg.model.backbone.norm_cfg.type == 'SyncBN'


def test_convert_turns_mmcv_sync_bn_into_qsync_bn_and_back():
    from mmcv.cnn import build_norm_layer
    from mmengine.model.utils import _BatchNormXd
    _, layer = build_norm_layer(dict(type='SyncBN'), 8)  # mmengine's SyncBatchNorm subclass
    original = type(layer)
    assert original is not nn.SyncBatchNorm and issubclass(original, nn.SyncBatchNorm)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layer, nn.SyncBatchNorm(8),
                          revert_sync_batchnorm(nn.SyncBatchNorm(8)))
    with settings('L3'):
        _, summary = actnn_mm.convert(model)
    assert [type(m) for m in model[1:]] == [actnn_mm.QSyncBatchNorm] * 3, summary
    assert summary.converted['SyncBatchNorm'] == 2 and not summary.skipped
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    model(x).sum().backward()  # one process: batch statistics, as a BatchNorm
    actnn_mm.revert(model)
    assert [type(m) for m in model[1:]] == [original, nn.SyncBatchNorm, _BatchNormXd]
    with settings('L1'):  # a level that does not compress norms leaves them
        _, summary = actnn_mm.convert(model)
    assert type(model[1]) is original and summary.skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU processes only')
@pytest.mark.parametrize('given, want', [
    (dict(), dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                  find_unused_parameters=True, device_ids=None)),
    (dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel', broadcast_buffers=True)),
     dict(type='MMDistributedDataParallel', broadcast_buffers=True, device_ids=None)),
])
def test_cpu_wrapper_keeps_the_config_and_drops_device_ids(given, want, monkeypatch):
    cfg = Config(dict(find_unused_parameters=True, **given))
    with _launched(monkeypatch):
        assert setup_cpu_distributed(cfg)
        assert dist.get_backend() == 'gloo'
    assert cfg.model_wrapper_cfg == want
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'


@pytest.mark.slow
def test_two_cpu_processes_train_sync_bn_config_at_l3(demo_data, tmp_path):
    """The user's run: an upstream SyncBN config, `actnn=dict(level='L3')`, dist_train.sh (the
    default run covers the same at L3 without its randomness, below)."""
    log, states, work = _run(tmp_path, demo_data, 'l3', "dict(level='L3')", world=2, batch=2)
    _assert_norms_compressed(log, 'L3', BUILT)
    records = train_scalars(work)
    assert [r['iter'] for r in records] == [1, 2]
    for r in records:
        assert r['actnn/ratio'] > 8 and r['actnn/avg_bits'] == pytest.approx(2, abs=0.05), r
    _assert_identical(states)


def test_two_cpu_processes_match_one_process_on_the_whole_batch(demo_data, tmp_path,
                                                               monkeypatch):
    """Two processes of 2 images against one process of the same 4 images per step, at L3
    (2-bit activations) without its randomness.

    Each process draws its own stochastic rounding noise and allocates L3's per-sample bits
    within its own half of the batch, and generic mode compresses a tensor or not by its size,
    which the batch changes; so the comparison rounds to nearest, at 2 bits for every sample,
    without generic mode. Then every sample's activations are quantized in groups of that
    sample alone, the same in both runs. The runs differ only by float rounding (statistics
    combined across processes, gradients averaged by DDP), which may move a few values across
    a rounding boundary. Measured: the final weights differ by 8e-4 of the last update and the
    running statistics by 5e-6 of their norm; with per-process statistics (QBN in place of
    QSyncBN; measured at L0, against the updates of 3 steps) both by about 0.1.
    """
    # one thread per process, as torchrun sets (2 threads on 2 busy cores ran 10x slower here)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    actnn = ("dict(level='L3', activation_compression_bits=[2], adaptive=False, stochastic=False, "
             "generic=False)")
    log, two, work = _run(tmp_path, demo_data, 'two', actnn, world=2, batch=2)
    _assert_norms_compressed(log, 'L3', BUILT)
    for r in train_scalars(work):
        assert r['actnn/avg_bits'] == pytest.approx(2) and r['actnn/ratio'] > 8, r
    _assert_identical(two)
    log, (one,), work = _run(tmp_path, demo_data, 'one', actnn, world=0, batch=4,
                             checkpoint=EVERY_ITER)
    _assert_norms_compressed(log, 'L3', CONVERTED)
    before = torch.load(work / 'iter_1.pth', weights_only=False)['state_dict']
    assert two[0].keys() == one.keys() == before.keys()
    err = update = 0.0
    for key, want in one.items():
        got = two[0][key]
        if not want.is_floating_point():
            assert torch.equal(got, want), key
        elif 'running_' in key:  # the statistics of the whole batch in every process
            assert (got - want).norm() <= 1e-4 * want.norm(), key
        else:
            err += (got.double() - want.double()).square().sum().item()
            update += (want.double() - before[key].double()).square().sum().item()
    assert err ** 0.5 <= 1e-2 * update ** 0.5, (err ** 0.5, update ** 0.5)
