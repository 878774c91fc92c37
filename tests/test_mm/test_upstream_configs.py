"""Upstream OpenMMLab configs train with ``actnn=dict(level='L3')`` and keep their gradients.

For each config of the installed mmdet, mmseg and mmpretrain in :data:`CASES` (CNNs and
transformers; detection, segmentation, classification, self-supervised learning), the model is
built the way a single-process run of ``tools/train.py`` builds it: the ``actnn`` key goes through
``apply_actnn_key``, the model is built from ``cfg.model`` in the codebase's default scope as the
mmengine Runner does, and the ActNNHook built from ``cfg.custom_hooks`` converts it and runs
generic mode around the training step. Then

1. one L3 training step (``model.train_step``) on a small synthetic batch has a finite loss,
   activations compressed to about 2 bits on average, and generic mode compressing what the
   transformers' attention saves;
2. at 8 bits (all layers converted at L2 with ``activation_compression_bits=[8]``, generic mode
   at 8 bits too) the parameter gradients of the same batch under the same seeds are close to
   those of the unconverted FP32 model, and the loss is the same (compression only changes
   what backward reads).

Pretrained weights are off, inputs small and the R-CNNs sample fewer RoIs per image; the
architectures are upstream's.
"""
import collections
import contextlib
import copy
import types
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import pytest
import torch
from mmengine.hub import get_config
from mmengine.logging import MessageHub, MMLogger
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS, MODELS, DefaultScope
from mmengine.runner.utils import set_random_seed
from mmengine.structures import InstanceData, PixelData
from torch import nn

import actnn_mm
from actnn_mm.compress import codec
from actnn_mm.mm import ActNNHook, apply_actnn_key
from test_layers.qchecks import settings

Case = collections.namedtuple('Case', 'config task size overrides transformer')

FEW_ROIS = {'model.train_cfg.rcnn.sampler.num': 16}  # 512 upstream: the RoI heads dominate
# The config, the kind of synthetic batch, the image side in pixels, settings merged into the
# config (small inputs), and whether the model is a transformer.
CASES = {
    'faster_rcnn_r50_fpn': Case('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
                                'det', 64, FEW_ROIS, False),
    'fcos_r50_gn_head': Case('mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
                             'det', 64, {}, False),
    'mask_rcnn_r50_fpn': Case('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                              'det_masks', 64, FEW_ROIS, False),
    'detr_r50': Case('mmdet::detr/detr_r50_8xb2-150e_coco.py', 'det', 64, {}, True),
    'segformer_mit_b0': Case('mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
                             'seg', 64, {'model.data_preprocessor.size': (64, 64)}, True),
    'pspnet_r50': Case('mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py',
                       'seg', 32, {'model.data_preprocessor.size': (32, 32)}, False),
    'upernet_swin_tiny': Case(
        'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
        'seg', 32, {'model.data_preprocessor.size': (32, 32)}, True),
    'resnet50': Case('mmpretrain::resnet/resnet50_8xb32_in1k.py', 'cls', 64, {}, False),
    'vit_base_p16': Case('mmpretrain::vision_transformer/vit-base-p16_64xb64_in1k.py',
                         'cls', 64, {'model.backbone.img_size': 64}, True),
    'convnext_tiny': Case('mmpretrain::convnext/convnext-tiny_32xb128_in1k.py',
                          'cls', 64, {}, False),
    'simclr_r50': Case('mmpretrain::simclr/simclr_resnet50_16xb256-coslr-200e_in1k.py',
                       'views', 64, {}, False),
    'mae_vit_base_p16': Case('mmpretrain::mae/mae_vit-base-p16_8xb512-amp-coslr-300e_in1k.py',
                             'mae', 64, {'model.backbone.img_size': 64,
                                         'model.neck.num_patches': 16}, True),
}
BATCH = 2
NUM_BOXES = 3
NUM_SEG_CLASSES = 19  # valid labels for the Cityscapes (19) and ADE20K (150) heads
# Bounds on the 8-bit gradients (all parameters together) against FP32, from the errors measured
# for these cases with margin: relative error of the gradient vector, cosine similarity.
MAX_RELATIVE_ERROR = 0.05
MIN_COSINE = 0.99


@pytest.fixture(autouse=True)
def private_rounding_seeds(monkeypatch):
    """Restore actnn_mm.config after each test, and draw the codec's rounding seeds from a
    private generator.

    The codec draws each seed from torch's default generator, so a compressed run would consume
    more of that stream than an FP32 run, and the model's own random ops drawn afterwards
    (dropout, drop path, RPN/RoI samplers, MAE masking, Mixup) would differ between the two runs
    compared. With a private generator both runs consume the same model randomness.
    """
    generator = torch.Generator().manual_seed(0)
    seed = torch.empty((), dtype=torch.int64)
    monkeypatch.setattr(codec, '_draw_seed',
                        lambda device: int(seed.random_(generator=generator)))
    with settings('L3'):
        yield


def _offline(node: Any) -> Any:
    """``node`` (a model config) without pretrained weights: no ``pretrained`` path, no
    ``init_cfg`` of type Pretrained (no downloads on test machines)."""
    if isinstance(node, list):
        return [_offline(item) for item in node if not _is_pretrained(item)]
    if not isinstance(node, dict):
        return node
    node = {key: None if key == 'pretrained' else _offline(value) for key, value in node.items()}
    if _is_pretrained(node.get('init_cfg')):
        node['init_cfg'] = None
    return node


def _is_pretrained(init_cfg: Any) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'


def _load(case: Case) -> Any:
    """The upstream config with small inputs and the user's ``actnn`` key applied."""
    cfg = get_config(case.config)
    cfg.merge_from_dict(case.overrides)
    cfg.model = _offline(cfg.model.to_dict())
    cfg.actnn = dict(level='L3')
    assert apply_actnn_key(cfg)
    return cfg


def _build(cfg: Any) -> nn.Module:
    """The model as a single-process mmengine Runner builds it for training (seeded; without
    the Runner's ``init_weights``, which changes only the starting values and takes seconds)."""
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:  # Runner.__init__
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    set_random_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(model_cfg)
    model = revert_sync_batchnorm(model)  # Runner.wrap_model without distributed training
    return model.train()  # as the training loop does (applies norm_eval)


def _images(generator: torch.Generator, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=generator)


def _det_sample(generator: torch.Generator, size: int, index: int, masks: bool) -> Any:
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks

    corner = torch.rand(NUM_BOXES, 2, generator=generator) * size / 2
    extent = (torch.rand(NUM_BOXES, 2, generator=generator) * 0.4 + 0.1) * size
    boxes = torch.cat([corner, corner + extent], 1).round()
    instances = InstanceData(bboxes=HorizontalBoxes(boxes),
                             labels=torch.randint(0, 80, (NUM_BOXES,), generator=generator))
    if masks:
        bitmaps = np.zeros((NUM_BOXES, size, size), dtype=np.uint8)
        for bitmap, (x0, y0, x1, y1) in zip(bitmaps, boxes.int().tolist()):
            bitmap[y0:y1, x0:x1] = 1
        instances.masks = BitmapMasks(bitmaps, size, size)
    return DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                       scale_factor=(1.0, 1.0), sample_idx=index),
                         gt_instances=instances)


def _batch(case: Case) -> Dict[str, Any]:
    """A synthetic batch as the codebase's dataloader yields it, with ``sample_idx`` as
    ``apply_actnn_key`` packs it (new objects at each call: data preprocessors and batch
    augments change the samples in place)."""
    from mmpretrain.structures import DataSample
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    size = case.size
    if case.task in ('det', 'det_masks'):
        return dict(inputs=list(_images(g, size)),
                    data_samples=[_det_sample(g, size, i, case.task == 'det_masks')
                                  for i in range(BATCH)])
    if case.task == 'seg':
        images = _images(g, size)
        labels = torch.randint(0, NUM_SEG_CLASSES, (BATCH, 1, size, size), generator=g)
        return dict(inputs=list(images), data_samples=[
            SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                        sample_idx=i), gt_sem_seg=PixelData(data=labels[i]))
            for i in range(BATCH)])
    samples = [DataSample(metainfo=dict(sample_idx=i)) for i in range(BATCH)]
    if case.task == 'cls':  # pseudo_collate: a list of images
        labels = torch.randint(0, 1000, (BATCH,), generator=g).tolist()
        return dict(inputs=list(_images(g, size)),
                    data_samples=[s.set_gt_label(label) for s, label in zip(samples, labels)])
    if case.task == 'views':  # default_collate of two views per image
        return dict(inputs=[_images(g, size), _images(g, size)], data_samples=samples)
    return dict(inputs=_images(g, size), data_samples=samples)  # 'mae': default_collate, 1 view


def _start_run(hook: ActNNHook, model: nn.Module, work_dir: str, name: str
               ) -> types.SimpleNamespace:
    """``hook.before_run`` and ``before_train`` with a stand-in for what it and its iteration
    hooks touch of an mmengine Runner; returns the stand-in."""
    runner = types.SimpleNamespace(model=model, work_dir=work_dir,
                                   logger=MMLogger.get_current_instance(),
                                   message_hub=MessageHub.get_instance(f'actnn-upstream-{name}'))
    hook.before_run(runner)
    hook.before_train(runner)
    return runner


@contextlib.contextmanager
def _iteration(hook: ActNNHook, runner: types.SimpleNamespace, batch: Dict[str, Any]
               ) -> Iterator[Optional[actnn_mm.compress_saved_tensors]]:
    """One training iteration between the hook's ``before_train_iter`` and ``after_train_iter``
    (also on failure, so generic mode never stays on); yields the generic-mode context the hook
    entered, if any."""
    hook.before_train_iter(runner, 0, batch)
    try:
        yield hook._generic
    finally:
        hook.after_train_iter(runner, 0, batch)


def _loss_and_grads(model: nn.Module, batch: Dict[str, Any]
                    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss of one seeded forward pass in training mode, and the gradients of all parameters."""
    set_random_seed(0)
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()
                           if p.grad is not None}


def _compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Tuple[float, float]:
    """Relative error ``||got - want|| / ||want||`` and cosine similarity of two sets of
    gradients, each taken as one vector: from norms per tensor (torch accumulates them in float64
    on the CPU, unlike a float32 dot product), without copying all gradients into one vector."""
    squares = [0.0, 0.0, 0.0]  # of the difference, of got, of want
    for name, w in want.items():
        for i, t in enumerate((got[name] - w, got[name], w)):
            squares[i] += float(torch.linalg.vector_norm(t)) ** 2
    error, got_norm, want_norm = (square ** 0.5 for square in squares)
    cosine = (got_norm ** 2 + want_norm ** 2 - error ** 2) / (2 * got_norm * want_norm)
    return error / want_norm, cosine


@pytest.mark.parametrize('name', list(CASES))
def test_upstream_config_trains_at_l3_and_keeps_8bit_gradients(name, tmp_path):
    case = CASES[name]
    cfg = _load(case)
    [hook_cfg] = [h for h in cfg.custom_hooks if h['type'] == 'ActNNHook']
    assert hook_cfg == dict(type='ActNNHook', level='L3')
    model = _build(cfg)
    fp32, int8 = copy.deepcopy(model), copy.deepcopy(model)

    # 1. One L3 training step, the ActNNHook from the config converting the model and running
    # generic mode.
    hook = HOOKS.build(hook_cfg)
    runner = _start_run(hook, model, str(tmp_path), name)
    optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-3))
    batch = _batch(case)
    with _iteration(hook, runner, batch) as generic:
        log_vars = model.train_step(batch, optim_wrapper)
    assert torch.isfinite(log_vars['loss'])
    step = actnn_mm.stats(model)
    assert len(step['layers']) > 10
    assert 1.5 <= step['average_bits'] <= 2.0, step['average_bits']
    assert step['ratio'] > 4, step['ratio']
    assert runner.message_hub.get_scalar('train/actnn/ratio').current() > 4
    if case.transformer:
        assert generic.stats.compressed > 0 and generic.stats.ratio > 4, generic.stats

    # 2. The same batch with the same seeds in FP32 and at 8 bits.
    loss32, grads32 = _loss_and_grads(fp32, _batch(case))
    hook8 = ActNNHook(level='L2', generic=True, activation_compression_bits=[8])
    runner8 = _start_run(hook8, int8, str(tmp_path), f'{name}-8bit')
    batch = _batch(case)
    with _iteration(hook8, runner8, batch) as generic8:
        loss8, grads8 = _loss_and_grads(int8, batch)
    assert actnn_mm.stats(int8)['average_bits'] == 8
    assert generic8.stats.compressed > 0 or not case.transformer
    torch.testing.assert_close(loss8, loss32, rtol=1e-5, atol=1e-6)
    assert grads8.keys() == grads32.keys()
    relative_error, cosine = _compare(grads8, grads32)
    print(f'{name}: 8-bit gradients: relative error {relative_error:.2e}, cosine {cosine:.6f}; '
          f'L3: average bits {step["average_bits"]:.3f}, ratio {step["ratio"]:.1f}')
    assert relative_error < MAX_RELATIVE_ERROR
    assert cosine > MIN_COSINE
