"""tools/train.py and tools/dist_train.sh end to end on demo data: resume, loading a converted
model's checkpoint into plain mmdet, an upstream config no preset covers, and two CPU processes
ending with identical weights."""
import os
import subprocess
import sys

import pytest
import torch

from test_mm.conftest import PRESET_DIR, REPO, TOOLS

DET_TEST_CONFIG = """
_base_ = '{base}'
data_root = '{data}/coco/'
model = dict(backbone=dict(init_cfg=None))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True), dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(data_root=data_root, ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, ann_file='annotations/instances_val2017.json',
    data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=2, val_interval=2)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=2))
log_processor = dict(by_epoch=False)
"""

CLS_TEST_CONFIG = """
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
actnn = dict(level='L3')
pipeline = [dict(type='LoadImageFromFile'), dict(type='RandomResizedCrop', scale=64),
            dict(type='PackInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    data_root='{data}/imagenet', split='', ann_file='meta/train.txt', data_prefix='train',
    pipeline=pipeline))
model = dict(head=dict(num_classes=10))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=2)
val_dataloader = None
val_cfg = None
val_evaluator = None
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=2))
log_processor = dict(by_epoch=False)
"""

# Each rank writes its final weights, to compare across processes.
DUMP_HOOK = """
custom_hooks = [dict(type='DumpWeightsHook', out='{out}')]
custom_imports = dict(imports=['actnn_mm', 'dump_weights_hook'], allow_failed_imports=False)
"""


def write(path, text):
    path.write_text(text)
    return str(path)


def train(config, work_dir, *args, dist=0, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(__file__)]),
               PYTHON=sys.executable, PORT=str(29500 + os.getpid() % 1000))
    if dist:
        cmd = ['bash', os.path.join(TOOLS, 'dist_train.sh'), config, str(dist)]
    else:
        cmd = [sys.executable, os.path.join(TOOLS, 'train.py'), config]
    proc = subprocess.run(cmd + ['--work-dir', str(work_dir), *args], env=env, text=True,
                          capture_output=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope='module')
def detector_run(demo_data, tmp_path_factory):
    """Faster R-CNN with `actnn=dict(level='L3')` trained 2 iterations (a checkpoint at 2)."""
    tmp = tmp_path_factory.mktemp('det')
    base = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
    config = write(tmp / 'det.py', DET_TEST_CONFIG.format(base=base, data=demo_data)
                   + "actnn = dict(level='L3')\n")
    log = train(config, tmp / 'work')
    return config, tmp / 'work', log


def test_detector_trains_validates_and_logs_stats(detector_run):
    _, work, log = detector_run
    assert 'actnn_mm (L3): converted' in log and 'actnn/avg_bits' in log
    assert 'Epoch(val)' in log or 'Iter(val)' in log
    assert os.path.exists(work / 'iter_2.pth')


def test_resume_continues_from_the_checkpoint(detector_run):
    config, work, _ = detector_run
    log = train(config, work, '--resume', '--cfg-options', 'train_cfg.max_iters=3',
                'train_cfg.val_interval=10')
    assert 'resumed epoch: 0, iter: 2' in log
    assert os.path.exists(work / 'iter_3.pth')


def test_converted_checkpoint_loads_into_plain_mmdet(detector_run):
    from mmdet.apis import inference_detector, init_detector
    from actnn_mm.mm import trusted_checkpoints

    config, work, _ = detector_run
    with trusted_checkpoints(str(work)):
        model = init_detector(config, str(work / 'iter_2.pth'), device='cpu',
                              cfg_options=dict(actnn=None, custom_hooks=[]))
    assert not any(type(m).__name__.startswith('Q') for m in model.modules())
    result = inference_detector(model, torch.randint(0, 255, (128, 128, 3), dtype=torch.uint8)
                                .numpy())
    assert result.pred_instances.bboxes.shape[-1] == 4


def test_untrusted_checkpoint_stays_weights_only(detector_run, tmp_path):
    import shutil
    from mmengine.runner.checkpoint import CheckpointLoader

    _, work, _ = detector_run
    copy = tmp_path / 'elsewhere.pth'
    shutil.copy(work / 'iter_2.pth', copy)
    with pytest.raises(Exception, match='[Ww]eights only'):
        CheckpointLoader.load_checkpoint(str(copy), map_location='cpu')


def test_upstream_config_without_preset_trains_with_amp(demo_data, tmp_path):
    config = write(tmp_path / 'cls.py', CLS_TEST_CONFIG.format(data=demo_data))
    log = train(config, tmp_path / 'work', '--amp')  # bfloat16 autocast on the CPU
    assert 'actnn_mm (L3): converted' in log and 'actnn/ratio' in log


def _dist_weights(tmp_path, config_text):
    out = tmp_path / 'weights'
    out.mkdir()
    config = write(tmp_path / 'dist.py', config_text + DUMP_HOOK.format(out=out))
    log = train(config, tmp_path / 'work', dist=2)
    assert 'actnn/avg_bits' in log
    ranks = sorted(out.glob('rank*.pth'))
    assert len(ranks) == 2, log[-3000:]
    return [torch.load(path) for path in ranks]


def _assert_identical(states):
    first, second = states
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_two_cpu_processes_train_detection_preset_identically(demo_data, tmp_path):
    base = os.path.join(PRESET_DIR, 'faster_rcnn_r50_8gpu.py')
    _assert_identical(_dist_weights(tmp_path, DET_TEST_CONFIG.format(base=base, data=demo_data)
                                    + "train_cfg = dict(val_interval=100)\n"))


MOCO_TEST_CONFIG = """
_base_ = '{base}'
model = dict(backbone=dict(init_cfg=None))
view_pipeline = [dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.2, 1.)),
                 dict(type='RandomFlip', prob=0.5)]
train_pipeline = [dict(type='LoadImageFromFile'),
                  dict(type='MultiView', num_views=2, transforms=[view_pipeline]),
                  dict(type='PackInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(data_root='{data}/imagenet', split='', ann_file='meta/train.txt',
                 data_prefix='train', pipeline=train_pipeline))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=2)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=2))
log_processor = dict(by_epoch=False)
"""


def test_two_cpu_processes_train_moco_preset_identically(demo_data, tmp_path):
    base = os.path.join(PRESET_DIR, 'moco_r50_v2_2gpu.py')
    _assert_identical(_dist_weights(tmp_path, MOCO_TEST_CONFIG.format(base=base, data=demo_data)))


def test_train_config_drops_scope_from_collate_fn(tmp_path):
    import argparse
    sys.path.insert(0, TOOLS)
    from train import build_config

    config = write(tmp_path / 'moco.py',
                   "_base_ = 'mmpretrain::mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py'\n")
    args = argparse.Namespace(config=config, cfg_options=None, launcher='none', work_dir=None,
                              amp=False, auto_scale_lr=False, resume=None)
    cfg = build_config(args)
    assert cfg.train_dataloader.collate_fn == {'type': 'default_collate'}
