"""The preset configs in configs/actnn/: they load, build the upstream architecture with ActNN
layers from the config route, keep the upstream recipe (total batch, lr, pretrained init), and
the single-GPU ones train end to end through tools/train.py on demo data."""
import collections
import copy
import glob
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.registry import MODELS, TRANSFORMS, DefaultScope
from torch import nn

import actnn_mm  # registers the ActNN layer names (QConv2d, QBN, ...) in mmengine's MODELS
from actnn_mm.layers.base import QLayer
from test_layers.qchecks import settings
from test_mm.conftest import PRESET_DIR, REPO, TOOLS

Preset = collections.namedtuple(
    'Preset', 'upstream gpus total_batch lr norm pretrained config_route')

# For each preset: its upstream config, GPU count, total batch the lr is meant for, that lr,
# the backbone's norm layer, the pretrained checkpoint, and the submodules whose every conv
# (and, for the backbone, every BN) the config route must already have built as ActNN layers.
PRESETS = {
    'faster_rcnn_r50_1gpu': Preset('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                                   1, 16, 0.02, 'QBatchNorm2d', 'upstream', ('backbone', 'neck')),
    'faster_rcnn_r50_8gpu': Preset('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                                   8, 16, 0.02, 'QBatchNorm2d', 'upstream', ('backbone', 'neck')),
    'retinanet_r50_1gpu': Preset('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
                                 1, 16, 0.01, 'QBatchNorm2d', 'upstream',
                                 ('backbone', 'neck', 'bbox_head.cls_convs',
                                  'bbox_head.reg_convs')),
    'retinanet_r50_8gpu': Preset('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
                                 8, 16, 0.01, 'QBatchNorm2d', 'upstream',
                                 ('backbone', 'neck', 'bbox_head.cls_convs',
                                  'bbox_head.reg_convs')),
    'fcn_r50_1gpu': Preset('mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                           1, 8, 0.01, 'QBatchNorm2d', 'upstream',
                           ('backbone', 'decode_head.convs', 'decode_head.conv_cat',
                            'auxiliary_head.convs')),
    'fcn_r50_4gpu': Preset('mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py',
                           4, 8, 0.01, 'QSyncBatchNorm', 'upstream',
                           ('backbone', 'decode_head.convs', 'decode_head.conv_cat',
                            'auxiliary_head.convs')),
    'fpn_r50_1gpu': Preset('mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py',
                           1, 8, 0.01, 'QBatchNorm2d', 'upstream',
                           ('backbone', 'neck', 'decode_head.scale_heads')),
    'fpn_r50_4gpu': Preset('mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py',
                           4, 8, 0.01, 'QSyncBatchNorm', 'upstream',
                           ('backbone', 'neck', 'decode_head.scale_heads')),
    'moco_r50_v2_1gpu': Preset('mmpretrain::mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py',
                               1, 256, 0.03, 'QBatchNorm2d', None, ('backbone', 'encoder_k')),
    'moco_r50_v2_2gpu': Preset('mmpretrain::mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py',
                               2, 512, 0.06, 'QSyncBatchNorm', None, ('backbone', 'encoder_k')),
}
UPSTREAM_BATCH_LR = {  # official total batch and lr of each upstream recipe
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py': (16, 0.02),
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py': (16, 0.01),
    'mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py': (8, 0.01),
    'mmseg::sem_fpn/fpn_r50_4xb2-80k_cityscapes-512x1024.py': (8, 0.01),
    'mmpretrain::mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py': (256, 0.03),
}
# Torch classes the ActNNHook converts (exact class), and the layer types the presets must not
# leave unconverted once the hook has run.
CONVERTIBLE = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear, nn.MaxPool2d, nn.SyncBatchNorm)


def preset_path(name):
    return os.path.join(PRESET_DIR, name + '.py')


def upstream_base(name):
    """The upstream config a preset inherits, directly or through the 1-GPU preset."""
    with open(preset_path(name)) as f:
        base = re.search(r"^_base_ = '([^']+)'", f.read(), re.M).group(1)
    return upstream_base(base[2:-3]) if base.startswith('./') else base


def offline(model_cfg):
    """The model config without pretrained weights (no downloads on test machines)."""
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.pop('pretrained', None)
    model_cfg.backbone.init_cfg = None
    return model_cfg


def build(cfg):
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(offline(cfg.model))


def submodule(model, path):
    for part in path.split('.'):
        model = getattr(model, part)
    return model


def class_counts(module):
    return collections.Counter(type(m).__name__ for m in module.modules())


def test_the_ten_presets_are_there():
    found = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(PRESET_DIR, '*.py')))
    assert found == sorted(PRESETS)


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_inherits_upstream_and_keeps_its_recipe(name):
    preset = PRESETS[name]
    assert upstream_base(name) == preset.upstream
    cfg = Config.fromfile(preset_path(name))
    assert cfg.actnn == dict(level='L3')
    # The total batch the configured lr is meant for: per-GPU batch x GPUs. The single-GPU and
    # upstream-sized presets keep the official total batch and lr; a larger batch scales the lr
    # linearly. auto_scale_lr names that total batch, so --auto-scale-lr scales from the truth.
    total = cfg.train_dataloader.batch_size * preset.gpus
    assert total == preset.total_batch
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(preset.lr)
    assert cfg.auto_scale_lr.base_batch_size == total
    assert not cfg.auto_scale_lr.enable
    up_batch, up_lr = UPSTREAM_BATCH_LR[preset.upstream]
    assert preset.lr / total == pytest.approx(up_lr / up_batch)
    # mmengine's distributed Runner reads a top-level `sync_bn` as its SyncBN conversion
    # ('torch' or 'mmcv'): anything else fails every multi-GPU run at start-up.
    assert cfg.get('sync_bn') in (None, 'torch', 'mmcv')
    # The Runner calls a collate_fn with its config's keys: no `_scope_` (which mmengine adds
    # to typed dicts inherited from another package's config) may reach it.
    assert '_scope_' not in cfg.train_dataloader.get('collate_fn', {})
    # The real pretrained initialisation stays for real users.
    if preset.pretrained == 'upstream':  # the same checkpoint as the upstream config names
        upstream = get_config(preset.upstream)
        assert cfg.model.backbone.get('init_cfg') == upstream.model.backbone.get('init_cfg')
        assert cfg.model.get('pretrained') == upstream.model.get('pretrained')
        assert cfg.model.backbone.get('init_cfg') or cfg.model.get('pretrained')


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_builds_upstream_architecture_with_actnn_layers(name):
    preset = PRESETS[name]
    cfg = Config.fromfile(preset_path(name))
    model = build(cfg)
    upstream = build(get_config(preset.upstream))  # the installed upstream config
    # Same parameters and buffers as the upstream model: the config route swaps layer classes
    # only (no norm or activation added where upstream has none).
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in upstream.state_dict().items()}
    assert got == want
    # Frozen stages and norm_eval as upstream.
    assert model.backbone.frozen_stages == upstream.backbone.frozen_stages
    assert model.backbone.norm_eval == upstream.backbone.norm_eval
    del upstream
    # The backbone's convs and BNs, and the convs of the listed parts, came from the registry.
    for path in preset.config_route:
        counts = class_counts(submodule(model, path))
        assert counts['QConv2d'] > 0, path
        assert counts['Conv2d'] == 0, (path, counts)
        if path in ('backbone', 'encoder_k'):
            assert counts[preset.norm] > 0, (path, counts)
            assert not counts['BatchNorm2d'] and not counts['SyncBatchNorm'], (path, counts)
            assert not counts['QBatchNorm2d' if preset.norm == 'QSyncBatchNorm'
                              else 'QSyncBatchNorm'], (path, counts)
    # QReLU where the module takes an act_cfg (mmseg decode heads).
    if cfg.default_scope == 'mmseg':
        assert class_counts(model.decode_head)['QReLU'] > 0
    # What the config route cannot reach (hard-coded nn.ReLU and nn.MaxPool2d in the ResNets,
    # RPNHead's nn.Conv2d, the bbox head's and MoCo neck's nn.Linear) is converted by the
    # ActNNHook's conversion at the preset's level: no plain layer of a supported type is left.
    with settings(cfg.actnn['level']):
        _, summary = actnn_mm.convert(model)
    left = [(n, type(m).__name__) for n, m in model.named_modules() if type(m) in CONVERTIBLE]
    assert not left, left
    assert summary.converted['ReLU'] > 0
    assert sum(isinstance(m, QLayer) for m in model.modules()) > 100


# mmdet's PackDetInputs and mmseg's PackSegInputs in the upstream training pipelines rely on
# their class defaults, which lack sample_idx: apply_actnn_key adds it to those defaults.
@pytest.mark.parametrize('name', sorted(PRESETS))
def test_actnn_key_adds_hook_imports_and_sample_indices(name):
    """tools/train.py's handling of the presets' `actnn` key: the ActNNHook, `custom_imports`,
    and `sample_idx` packed with every training sample (for the adaptive allocator)."""
    from actnn_mm.mm import apply_actnn_key
    cfg = Config.fromfile(preset_path(name))
    assert apply_actnn_key(cfg)
    assert 'actnn_mm' in cfg.custom_imports['imports']
    hooks = [h for h in cfg.custom_hooks if h['type'] == 'ActNNHook']
    assert len(hooks) == 1 and hooks[0]['level'] == 'L3'
    pipeline = cfg.train_dataloader.dataset.pipeline
    packs = [t for t in pipeline if t['type'].startswith('Pack')]
    assert packs
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        for t in packs:
            assert 'sample_idx' in TRANSFORMS.build(t).meta_keys, t


# End-to-end training through tools/train.py on the demo data: tiny images, batch 2, two
# iterations, validation once (no validation in MoCo's upstream recipe), logs every iteration.
COCO_CFG = """
    _base_ = '{preset}'
    data_root = '{data}/coco/'
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=(128, 128), keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs')]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(128, 128), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='PackDetInputs',
             meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
    # no score threshold: two iterations from scratch score below upstream's 0.05, and COCO
    # evaluation needs detections to report a mAP
    model = dict(backbone=dict(init_cfg=None), test_cfg={test_cfg})
    train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                            dataset=dict(data_root=data_root, pipeline=train_pipeline))
    val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                          dataset=dict(data_root=data_root, pipeline=test_pipeline))
    test_dataloader = val_dataloader
    val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
    test_evaluator = val_evaluator
    # 4 images, batch 2: one epoch is the two iterations; validation and checkpoint after it
    train_cfg = dict(max_epochs=1, val_interval=1)
    default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
"""
CITYSCAPES_CFG = """
    _base_ = '{preset}'
    data_root = '{data}/cityscapes/'
    crop_size = (128, 128)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations'),
        dict(type='Resize', scale=(256, 128), keep_ratio=True),
        dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs')]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(256, 128), keep_ratio=True),
        dict(type='LoadAnnotations'),
        dict(type='PackSegInputs')]
    model = dict(pretrained=None, data_preprocessor=dict(size=crop_size))
    train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                            dataset=dict(data_root=data_root, pipeline=train_pipeline))
    val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                          dataset=dict(data_root=data_root, pipeline=test_pipeline))
    test_dataloader = val_dataloader
    train_cfg = dict(max_iters=2, val_interval=2)
    default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
"""
IMAGENET_CFG = """
    _base_ = '{preset}'
    view_pipeline = [
        dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.2, 1.), backend='pillow'),
        # upstream's hue=0.1: needs actnn_mm.mm.compat's fix of mmcv's adjust_hue under numpy 2
        dict(type='RandomApply', prob=0.8, transforms=[
            dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)]),
        dict(type='RandomGrayscale', prob=0.2, keep_channels=True,
             channel_weights=(0.114, 0.587, 0.2989)),
        dict(type='GaussianBlur', magnitude_range=(0.1, 2.0), magnitude_std='inf', prob=0.5),
        dict(type='RandomFlip', prob=0.5)]
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='MultiView', num_views=2, transforms=[view_pipeline]),
        dict(type='PackInputs')]
    train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                            dataset=dict(data_root='{data}/imagenet/', pipeline=train_pipeline))
    # 4 images, batch 2 (drop_last): one epoch is the two iterations
    train_cfg = dict(max_epochs=1)
    default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
"""
TRAINED = {  # single-GPU preset: (test config, a validation metric in the log)
    'faster_rcnn_r50_1gpu': (COCO_CFG.replace('{test_cfg}', 'dict(rcnn=dict(score_thr=0.0))'),
                             'coco/bbox_mAP'),
    'retinanet_r50_1gpu': (COCO_CFG.replace('{test_cfg}', 'dict(score_thr=0.0)'),
                           'coco/bbox_mAP'),
    'fcn_r50_1gpu': (CITYSCAPES_CFG, 'mIoU'),
    'fpn_r50_1gpu': (CITYSCAPES_CFG, 'mIoU'),
    'moco_r50_v2_1gpu': (IMAGENET_CFG, None),
}


def run_train(config, work_dir, *extra, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.join(TOOLS, 'train.py'), str(config), '--work-dir',
         str(work_dir), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


def run_log(work_dir):
    logs = sorted(glob.glob(os.path.join(str(work_dir), '*', '*.log')))
    assert logs, f'no log in {work_dir}'
    with open(logs[-1]) as f:
        return f.read()


def train_scalars(work_dir):
    """The per-iteration records of vis_data/scalars.json (those with a loss)."""
    files = sorted(glob.glob(os.path.join(str(work_dir), '*', 'vis_data', 'scalars.json')))
    assert files, f'no scalars.json in {work_dir}'
    with open(files[-1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if 'loss' in r]


@pytest.mark.parametrize('name', sorted(TRAINED))
def test_single_gpu_preset_trains_on_demo_data(name, demo_data, tmp_path):
    template, metric = TRAINED[name]
    config = tmp_path / f'{name}_demo.py'
    config.write_text(textwrap.dedent(template).format(preset=preset_path(name), data=demo_data))
    work_dir = tmp_path / 'work'
    proc, seconds = run_train(config, work_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = run_log(work_dir)
    # ActNNHook converted the model and logged the compression of every iteration.
    assert 'ActNNHook' in log
    assert re.search(r'actnn_mm \(L3\): converted', log), log[-3000:]
    records = train_scalars(work_dir)
    assert [r['iter'] for r in records] == [1, 2]
    for r in records:
        assert r['actnn/mib'] > 0
        assert r['actnn/ratio'] > 4, r  # ~2-bit activations: far below fp32
        assert 0 < r['actnn/avg_bits'] <= 8
        assert torch.isfinite(torch.tensor(r['loss']))
    assert len(re.findall(r'Iter\(train\)|Epoch\(train\)', log)) >= 2
    assert 'actnn/avg_bits' in log and 'actnn/ratio' in log
    # Validation ran once, after the two iterations.
    if metric is not None:
        assert len(re.findall(re.escape(metric) + r': ', log)) == 1, log[-3000:]
    else:
        assert '(val)' not in log
    assert glob.glob(os.path.join(str(work_dir), '*.pth')), os.listdir(work_dir)
    print(f'{name}: {seconds:.0f} s')


@pytest.mark.parametrize('backend', ['pillow', 'cv2'])
def test_color_jitter_hue_under_numpy2(backend, tmp_path):
    """The MoCo v2 presets' augmentation needs mmcv.adjust_hue with negative factors: mmcv 2.1.0
    computes np.uint8(hue_factor * 255), which numpy >= 2 refuses for negative factors;
    actnn_mm.mm.compat_fixes (entered by tools/train.py and the ActNNHook) restores numpy 1's
    wrap-around."""
    import mmcv
    import numpy as np

    from actnn_mm.mm import compat_fixes
    cfg = Config.fromfile(preset_path('moco_r50_v2_1gpu'))
    views = cfg.train_dataloader.dataset.pipeline[1]['transforms'][0]
    jitter = [t for v in views if v['type'] == 'RandomApply' for t in v['transforms']]
    assert jitter[0]['type'] == 'ColorJitter' and jitter[0]['hue'] == 0.1
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    with compat_fixes(str(tmp_path)):
        out = mmcv.adjust_hue(img, -jitter[0]['hue'], backend=backend)
    assert out.shape == img.shape and out.dtype == np.uint8
