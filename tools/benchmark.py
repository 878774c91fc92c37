"""Benchmarks, each figure measured side by side in one run.

    python tools/benchmark.py codec  [--shape 64 64 56 56]
    python tools/benchmark.py memory [--model vit-b16 --batch 16 --image-size 224 --methods FP32 L3]
    python tools/benchmark.py pareto [--models resnet50 faster-rcnn --batch 2 --image-size 128]
    python tools/benchmark.py maxbatch [--budget 512 --image-size 64 --methods FP32 AMP CP L3]
    python tools/benchmark.py gpu --out OUT_DIR [--models resnet50 vit-b16 --time-limit 180]

Results are printed as a table and saved as JSON (maxbatch, pareto and gpu also a PNG plot) under
work_dirs/bench/ (gpu: under --out). memory's and pareto's models are in BENCH_MODELS: mmpretrain's
ResNet-50, ViT-B/16 and Swin-T, and the OpenMMLab presets of configs/actnn/ (faster-rcnn,
retinanet, fcn, fpn, mocov2); their methods (METHODS) include mmengine's own memory savers. gpu
needs a CUDA device and no OpenMMLab package: torchvision's ResNet-50 and ViT-B/16 (VISION_MODELS).
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from actnn_mm.compress import dequantize, extension_loaded, quantize, reference
from actnn_mm.compress.codec import samples_view
from actnn_mm.config import LEVELS
from actnn_mm.generic import GenericStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from actnn_mm.generic import compress_saved_tensors

OUT_DIR = os.path.join('work_dirs', 'bench')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _save(name: str, result: Dict, directory: Optional[str] = None) -> str:
    """Save ``result`` as ``<directory>/<name>.json`` (default: :data:`OUT_DIR`)."""
    directory = directory or OUT_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f'{name}.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    return path


def _run_script(args: List[str], release_freed: bool,
                timeout: Optional[float] = None) -> Tuple[Optional[int], List[Dict], str]:
    """Run this script with ``args`` in a fresh process.

    Args:
        args: its command line (a hidden probe study and its options).
        release_freed: run it under ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns
            freed memory at once and the resident set measures what is held; else with the
            default allocator settings, which are faster.
        timeout: seconds after which it is killed.

    Returns:
        Its exit status (None: killed at ``timeout``), the JSON objects it printed (one per
        line, in order) and the tail of its stderr.
    """
    env = dict(os.environ)
    env.pop('MALLOC_MMAP_THRESHOLD_', None)
    if release_freed:
        env['MALLOC_MMAP_THRESHOLD_'] = '65536'
    try:
        proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # its output so far: bytes on POSIX
        status = None
        out, err = (s.decode(errors='replace') if isinstance(s, bytes) else s or ''
                    for s in (e.stdout, e.stderr))
    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    return status, lines, err[-3000:]


def codec(args: argparse.Namespace) -> Dict:
    """Quantize and dequantize throughput of the kernels and of the reference vs a memory copy."""
    if not extension_loaded():
        raise SystemExit('the C++ extension is not built: run `make install` first')
    torch.manual_seed(0)
    x = torch.randn(*args.shape)
    gb = x.numel() * x.element_size() / 1e9
    copy_out = torch.empty_like(x)
    copy_s = _median_seconds(lambda: copy_out.copy_(x), args.repeat)
    clone_s = _median_seconds(lambda: x.clone(), args.repeat)  # what an op with a new output pays
    rows: List[Dict] = []
    for bits in (1, 2, 4, 8):
        c = quantize(x, bits)
        samples, _ = samples_view(x)
        n, m = samples.shape
        ref_args = (c.bits, c.offsets, c.group_size, 0, True, c.data.numel())
        timings = {
            'kernel_quantize': _median_seconds(lambda: quantize(x, bits), args.repeat),
            'kernel_dequantize': _median_seconds(lambda: dequantize(c), args.repeat),
            'reference_quantize': _median_seconds(
                lambda: reference.quantize(samples, *ref_args), args.ref_repeat),
            'reference_dequantize': _median_seconds(
                lambda: reference.dequantize(c.data, c.meta, c.sample_meta, c.bits, c.offsets,
                                             n, m, c.group_size, x.dtype), args.ref_repeat),
        }
        rows.append({'bits': bits, 'ratio': x.numel() * 4 / c.nbytes,
                     **{k: gb / v for k, v in timings.items()}})
    print(f'codec throughput on {tuple(x.shape)} float32 ({gb * 1e3:.0f} MB), '
          f'{torch.get_num_threads()} threads; GB/s of float32 input (x memory copy)')
    print(f'memory copy: {gb / copy_s:.2f} GB/s into an existing tensor, {gb / clone_s:.2f} GB/s '
          f'into a new one (clone)')
    header = ['bits', 'compression', 'C++ quantize', 'C++ dequantize', 'ref quantize',
              'ref dequantize', 'C++/ref q', 'C++/ref dq']
    print(' | '.join(f'{h:>14}' for h in header))
    copy_gbs = gb / copy_s
    for r in rows:
        cells = [str(r['bits']), f"{r['ratio']:.2f}x"]
        cells += [f'{r[k]:.2f} ({r[k] / copy_gbs:.2f}x)' for k in
                  ('kernel_quantize', 'kernel_dequantize', 'reference_quantize',
                   'reference_dequantize')]
        cells += [f"{r['kernel_quantize'] / r['reference_quantize']:.0f}x",
                  f"{r['kernel_dequantize'] / r['reference_dequantize']:.0f}x"]
        print(' | '.join(f'{c:>14}' for c in cells))
    result = {'shape': list(x.shape), 'threads': torch.get_num_threads(),
              'copy_gbs': copy_gbs, 'clone_gbs': gb / clone_s, 'rows': rows}
    print('saved', _save('codec', result))
    return result


def _images(batch: int, size: int) -> List[torch.Tensor]:
    """Random 8-bit images (C, H, W), as a dataloader yields them before the data preprocessor."""
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(batch)]


def _classification_batch(batch: int, size: int, classes: int) -> Dict:
    """Images with one random class label each."""
    from mmpretrain.structures import DataSample
    return {'inputs': _images(batch, size),
            'data_samples': [DataSample().set_gt_label(int(label))
                             for label in torch.randint(classes, (batch,))]}


def _detection_batch(batch: int, size: int, classes: int, boxes: int = 8) -> Dict:
    """Images with ``boxes`` random ground-truth boxes each, 16 to ``size / 2 + 16`` pixels wide."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    samples = []
    for _ in range(batch):
        corner = torch.rand(boxes, 2) * size / 2
        extent = torch.rand(boxes, 2) * size / 2 + 16
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([corner, corner + extent], 1).clamp(max=size),
            labels=torch.randint(classes, (boxes,)))
        samples.append(sample)
    return {'inputs': _images(batch, size), 'data_samples': samples}


def _segmentation_batch(batch: int, size: int, classes: int) -> Dict:
    """Images with a random class label per pixel."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(classes, (1, size, size)))
        samples.append(sample)
    return {'inputs': _images(batch, size), 'data_samples': samples}


def _two_view_batch(batch: int, size: int) -> Dict:
    """Two views of each image, stacked per view (MoCo's pipeline with default_collate)."""
    from mmpretrain.structures import DataSample
    return {'inputs': [torch.stack(_images(batch, size)) for _ in range(2)],
            'data_samples': [DataSample() for _ in range(batch)]}


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A model of the memory study.

    Attributes:
        title: its name in the printed table.
        config: its config: 'scope::path' in an installed codebase, or a path in this repo.
        make_batch: ``(batch size, image size) -> data`` as a dataloader gives it to the model's
            data preprocessor (random images and labels).
        batch: default batch size.
        image_size: default image side.
    """

    title: str
    config: str
    make_batch: Callable[[int, int], Dict]
    batch: int
    image_size: int


# Classifiers at ImageNet's training size and this study's historical batch of 16. The detection
# and segmentation presets at their recipe's per-GPU batch of 2, on 512x512 images (COCO's are
# 1333x800, Cityscapes crops 512x1024) so that a step takes seconds on a CPU; FCN's dilated
# ResNet (stages 3-4 at 1/8 resolution) costs ~5x Semantic FPN's, hence 256x256. MoCo v2 at 16
# pairs of 224x224 views (upstream: 32 per GPU), the batch of the classifiers.
BENCH_MODELS: Dict[str, BenchModel] = {
    'resnet50': BenchModel('mmpretrain ResNet-50', 'mmpretrain::resnet/resnet50_8xb32_in1k.py',
                           functools.partial(_classification_batch, classes=1000), 16, 224),
    'vit-b16': BenchModel('mmpretrain ViT-B/16',
                          'mmpretrain::vision_transformer/vit-base-p16_64xb64_in1k.py',
                          functools.partial(_classification_batch, classes=1000), 16, 224),
    'swin-t': BenchModel('mmpretrain Swin-T',
                         'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
                         functools.partial(_classification_batch, classes=1000), 16, 224),
    'faster-rcnn': BenchModel('Faster R-CNN R50-FPN (preset)',
                              'configs/actnn/faster_rcnn_r50_1gpu.py',
                              functools.partial(_detection_batch, classes=80), 2, 512),
    'retinanet': BenchModel('RetinaNet R50-FPN (preset)', 'configs/actnn/retinanet_r50_1gpu.py',
                            functools.partial(_detection_batch, classes=80), 2, 512),
    'fcn': BenchModel('FCN R50-D8 (preset)', 'configs/actnn/fcn_r50_1gpu.py',
                      functools.partial(_segmentation_batch, classes=19), 2, 256),
    'fpn': BenchModel('Semantic FPN R50 (preset)', 'configs/actnn/fpn_r50_1gpu.py',
                      functools.partial(_segmentation_batch, classes=19), 2, 512),
    'mocov2': BenchModel('MoCo v2 R50 (preset)', 'configs/actnn/moco_r50_v2_1gpu.py',
                         _two_view_batch, 16, 224),
}


class Unsupported(Exception):
    """A method the model cannot run (e.g. checkpointing in a backbone without ``with_cp``)."""


def _stage_names(model: torch.nn.Module) -> List[str]:
    """The backbone's stages as mmengine's ``activation_checkpointing`` key names them: a
    ResNet's ``res_layers``, a ViT's encoder layers, a Swin's blocks (its stages take keyword
    arguments, which mmengine's checkpointing wrapper does not pass on).

    Raises:
        Unsupported: a backbone of another kind.
    """
    backbone = model.backbone
    if hasattr(backbone, 'res_layers'):
        return [f'backbone.{name}' for name in backbone.res_layers]
    if hasattr(backbone, 'stages'):
        return [f'backbone.stages.{i}.blocks.{j}' for i, stage in enumerate(backbone.stages)
                for j in range(len(stage.blocks))]
    if hasattr(backbone, 'layers'):
        return [f'backbone.layers.{i}' for i in range(len(backbone.layers))]
    raise Unsupported(f'no known stages in {type(backbone).__name__}')


def _native_savers(model: torch.nn.Module, extras: FrozenSet[str]) -> None:
    """Apply mmengine's own memory savers as its Runner does for the top-level config keys
    ``activation_checkpointing`` (ACP: here the backbone's stages) and ``efficient_conv_bn_eval``
    (ECBE: here ``['backbone']``; it fuses a convolution with the eval-mode BatchNorm after it).

    Here they are applied before ActNN converts the model. A Runner applies them after its hooks'
    ``before_run``, where :class:`~actnn_mm.mm.ActNNHook` converts it, and ECBE's ``torch.fx``
    trace fails on ActNN layers (their forward branches on tensors).

    Raises:
        Unsupported: ECBE with a backbone whose BatchNorms train (``norm_eval`` unset or False):
            it would change nothing.
    """
    if 'ACP' in extras:
        from mmengine.runner.activation_checkpointing import turn_on_activation_checkpointing
        turn_on_activation_checkpointing(model, _stage_names(model))
    if 'ECBE' in extras:
        from mmengine.model.efficient_conv_bn_eval import turn_on_efficient_conv_bn_eval
        norm_eval = getattr(model.backbone, 'norm_eval', None)
        if not norm_eval:
            raise Unsupported(f'{type(model.backbone).__name__} has no eval-mode BatchNorm to '
                              f'fuse (norm_eval={norm_eval})')
        turn_on_efficient_conv_bn_eval(model, ['backbone'])


def _build(name: str, image_size: int, extras: FrozenSet[str] = frozenset()) -> torch.nn.Module:
    """Model ``name`` of :data:`BENCH_MODELS` with plain torch layers, untrained.

    The config's model as a Runner builds and initializes it (the top-level data preprocessor as
    default; a detection head's prior-probability bias keeps its first losses, and so the steps
    that follow, finite), without pretrained weights; a transformer's position embedding and
    the segmentation preprocessor's padding are sized for ``image_size``. Layers a preset builds
    as ActNN layers are reverted, so every method starts from the upstream model.

    Args:
        name: a key of :data:`BENCH_MODELS`.
        image_size: the side of the images.
        extras: memory savers besides ActNN and AMP: 'CP' (``with_cp=True`` on the backbone),
            'ACP' and 'ECBE' (:func:`_native_savers`).

    Raises:
        Unsupported: the model cannot run one of ``extras``, e.g. CP and the backbone takes no
            ``with_cp``.
    """
    import actnn_mm
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS, DefaultScope

    path = BENCH_MODELS[name].config
    cfg = get_config(path) if '::' in path else Config.fromfile(os.path.join(REPO, path))
    model_cfg = cfg.model
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    model_cfg.pop('pretrained', None)
    model_cfg.backbone.init_cfg = None
    if 'img_size' in model_cfg.backbone:
        model_cfg.backbone.img_size = image_size
    if 'size' in (model_cfg.data_preprocessor or {}):
        model_cfg.data_preprocessor.size = (image_size, image_size)
    if 'CP' in extras:
        model_cfg.backbone.with_cp = True
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        try:
            model = MODELS.build(model_cfg)
        except TypeError as e:
            if 'CP' in extras and 'with_cp' in str(e):
                raise Unsupported(f'{model_cfg.backbone.type} takes no with_cp') from e
            raise
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # not the report of every parameter's initialization
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    model = actnn_mm.revert(model)
    _native_savers(model, extras)
    return model


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _reset_peak_rss() -> None:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current resident set


def _peak_rss_bytes() -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) * 1024


class _SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """Counts the unique storages autograd saves, parameters excluded.

    Only the innermost saved-tensor hooks run: entered outside generic mode, it sees nothing of
    what generic mode packs (which :class:`GenericStats` counts) and does not disable it.
    """

    def __init__(self, params: List[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.skip:
                self.storages[ptr] = t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


# A method is FP32, an ActNN level, a memory saver, or a level and savers joined by '+'. CP is
# the codebases' `with_cp=True`, ACP and ECBE are mmengine's `activation_checkpointing` and
# `efficient_conv_bn_eval` config keys (see _native_savers).
METHODS = ('FP32', 'AMP', 'CP', 'ACP', 'ECBE', 'L0', 'L1', 'L2', 'L3', 'L4', 'L5', 'L3+AMP',
           'L3+CP', 'L3+ACP', 'L3+ECBE')
# A level may name its bits: LEVEL@BITS (e.g. L3@1.5: L3 at an average budget of 1.5 bits)
BUDGET = '@'


def set_level(spec: str) -> None:
    """Set an ActNN level, or ``LEVEL@BITS``: the level with ``activation_compression_bits``
    ``[BITS]`` (a width, or an average budget at L3-L5)."""
    import actnn_mm

    level, _, bits = spec.partition(BUDGET)
    actnn_mm.set_optimization_level(level)
    if bits:
        actnn_mm.config.activation_compression_bits = [float(bits)]


def check_level(spec: str) -> None:
    """Raise ValueError unless ``spec`` is a level or ``LEVEL@BITS`` that config accepts (checked
    on a scratch config: the global one, and the environment L5 changes, are left alone)."""
    from actnn_mm.config import Config

    level, _, bits = spec.partition(BUDGET)
    if level not in LEVELS:
        raise ValueError(f'unknown level {level!r}')
    scratch = Config()
    scratch.activation_compression_bits = [2]  # valid with and without adaptive
    scratch.adaptive = LEVELS.index(level) >= LEVELS.index('L3')
    if bits:
        scratch.activation_compression_bits = [float(bits)]


def method_spec(text: str) -> str:
    """An argparse type: one of METHODS, or one whose level names its bits (``L3@1.5``,
    ``L3@1.5+CP``)."""
    level, _ = _method_parts(text)
    try:
        if (text.replace(level, level.partition(BUDGET)[0]) if level else text) not in METHODS:
            raise ValueError(f'expected one of {METHODS}, a level with {BUDGET}BITS (e.g. '
                             f'L3{BUDGET}1.5)')
        if level:
            check_level(level)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'{text!r}: {e}') from e
    return text


def _method_parts(method: str) -> Tuple[Optional[str], FrozenSet[str]]:
    """The ActNN level of ``method`` (None for none) and its other parts: 'L3+AMP' -> ('L3',
    {'AMP'}), 'FP32' -> (None, {})."""
    parts = set(method.split('+')) - {'FP32'}
    levels = {part for part in parts if part.partition(BUDGET)[0] in LEVELS}
    return next(iter(levels), None), frozenset(parts - levels)


@dataclasses.dataclass
class _Training:
    """A model set up to train with one method on one random batch.

    Attributes:
        model: the model (converted for the L levels, with the method's savers applied).
        optimizer: SGD with momentum over its parameters.
        loss: the model's loss on the batch, computed plainly (:meth:`forward` adds the method).
        autocast: the forward's autocast context, enabled for AMP.
        scaler: the gradient scaler, enabled for AMP on CUDA (float16).
        generic: the generic-mode context the forward runs in (L3 and above), else None.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    generic: Optional['compress_saved_tensors']

    def forward(self) -> torch.Tensor:
        """The loss of the batch, as the method computes it."""
        with self.autocast, self.generic or contextlib.nullcontext():
            return self.loss()

    def update(self, loss: torch.Tensor) -> None:
        """Backward from ``loss`` and an optimizer step."""
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def step(self) -> None:
        """One training step: zero the gradients, forward, backward, optimizer step."""
        self.optimizer.zero_grad(set_to_none=False)
        self.update(self.forward())

    def init_state(self) -> None:
        """Create the gradients and momentum buffers (zeros) without changing a weight."""
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()


def _method_training(method: str, device: torch.device,
                     build: Callable[[FrozenSet[str]], torch.nn.Module],
                     make_loss: Callable[[torch.nn.Module], Callable[[], torch.Tensor]]
                     ) -> _Training:
    """Set up the training of a model by ``method`` on ``device``.

    The level is set before the model touches the device, so L5's allocator setting takes
    effect; the model is converted after the optimizer is built, and from L3 on the forward also
    runs in generic mode, as :class:`~actnn_mm.mm.ActNNHook` does. AMP autocasts to bfloat16 on
    the CPU and to float16 with a gradient scaler on CUDA.

    Args:
        method: FP32, a level, savers or a level and savers joined by '+' (see :data:`METHODS`).
        device: where to train.
        build: the method's savers other than AMP (e.g. {'CP'}) -> the model, on the CPU.
        make_loss: the model, on ``device`` -> a function computing its loss on a batch.

    Raises:
        Unsupported: ``build`` cannot apply the savers.
    """
    import actnn_mm

    level, extras = _method_parts(method)
    if level:
        set_level(level)
    torch.manual_seed(0)
    model = build(extras - {'AMP'}).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if level:
        actnn_mm.QModule(model)
    adaptive = level and LEVELS.index(level.partition(BUDGET)[0]) >= LEVELS.index('L3')
    generic = actnn_mm.compress_saved_tensors(model) if adaptive else None
    amp = 'AMP' in extras
    return _Training(model, optimizer, make_loss(model),
                     torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16
                                    if device.type == 'cpu' else torch.float16),
                     torch.amp.GradScaler(device.type, enabled=amp and device.type == 'cuda'),
                     generic)


def _training(name: str, method: str, batch: int, image_size: int,
              device: torch.device) -> _Training:
    """Model ``name`` of :data:`BENCH_MODELS` set up by :func:`_method_training`.

    The batch goes through the model's data preprocessor once (in training mode, with its batch
    augments); each forward computes the model's losses on it and sums them, as a training step
    does.

    Raises:
        Unsupported: the model cannot run ``method``.
    """
    def make_loss(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        data = model.data_preprocessor(BENCH_MODELS[name].make_batch(batch, image_size),
                                       training=True)
        return lambda: model.parse_losses(model(**data, mode='loss'))[0]

    return _method_training(method, device, functools.partial(_build, name, image_size),
                            make_loss)


def _warmed_up(name: str, method: str, batch: int, image_size: int) -> Union[_Training, Dict]:
    """The training of ``name`` by ``method`` after one step (so gradients and optimizer state
    exist), or ``{'method', 'unsupported'}`` when the model cannot run it: CP with a backbone
    without ``with_cp``, ECBE without eval-mode BatchNorms, AMP through an op without a bfloat16
    CPU kernel."""
    try:
        run = _training(name, method, batch, image_size, torch.device('cpu'))
        run.step()
    except Unsupported as e:
        return {'method': method, 'unsupported': str(e)}
    except RuntimeError as e:  # an op without a bfloat16 CPU kernel (e.g. mmcv's nms)
        if 'AMP' not in _method_parts(method)[1]:
            raise
        where = os.path.relpath(traceback.extract_tb(e.__traceback__)[-1].filename,
                                os.path.dirname(os.path.dirname(torch.__file__)))
        return {'method': method, 'unsupported': f'fails in {where}: {str(e).splitlines()[0]}'}
    gc.collect()
    return run


def measure_memory(name: str, method: str, batch: int, image_size: int) -> Dict:
    """Activation memory held after the forward pass of one training step, and its peak.

    Run it in a fresh process under ``MALLOC_MMAP_THRESHOLD_=65536`` for a meaningful RSS.

    Returns:
        ``method``; ``rss_bytes``: RSS growth over the forward pass; ``counted_bytes``: what
        autograd saves outside generic mode (unique storages, parameters excluded) + what the
        ActNN layers hold + what generic mode keeps (``generic_bytes`` compressed,
        ``generic_kept_bytes`` left in full precision by reason, counted at each save);
        ``peak_bytes``: the peak RSS of the whole step above what the model, its gradients, the
        optimizer state and the batch hold; ``untrained_params``: trainable parameters (elements)
        the first step left without a gradient. Only ``method`` and ``unsupported`` (the reason)
        when the model cannot run it.
    """
    from actnn_mm.layers.saved import held_bytes

    run = _warmed_up(name, method, batch, image_size)
    if isinstance(run, dict):
        return run
    untrained = sum(p.numel() for p in run.model.parameters()
                    if p.requires_grad and p.grad is None)
    counter = _SavedTensorCounter(list(run.model.parameters()))
    run.optimizer.zero_grad(set_to_none=False)
    with _TrainingMemory(torch.device('cpu')) as step:
        before_rss, before_held = _rss_bytes(), held_bytes()
        with counter:  # outside generic mode, which the forward enters at L3+
            loss = run.forward()
        after_rss = _rss_bytes()
        generic = run.generic.stats if run.generic else GenericStats()
        kept = dict(generic.kept_bytes)
        counted = (counter.nbytes + held_bytes() - before_held + generic.saved_bytes
                   + sum(kept.values()))
        run.update(loss)
        del loss
    return {'method': method, 'rss_bytes': after_rss - before_rss, 'counted_bytes': counted,
            'generic_bytes': generic.saved_bytes, 'generic_kept_bytes': kept,
            'peak_bytes': step.peak(), 'untrained_params': untrained}


def measure_step_time(name: str, method: str, batch: int, image_size: int, steps: int) -> Dict:
    """Median wall time of ``steps`` training steps after a warm-up one.

    Run it in a fresh process with the default allocator settings: under
    ``MALLOC_MMAP_THRESHOLD_=65536`` every freed tensor returns to the system and is faulted in
    again, which slows full-precision training most (ResNet-50, batch 16, 224 px: FP32 1.8x).

    Returns:
        ``method``, ``step_seconds`` and ``load_average`` (1-minute, at the end), or ``method``
        and ``unsupported`` as :func:`measure_memory`.
    """
    run = _warmed_up(name, method, batch, image_size)
    if isinstance(run, dict):
        return run
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        run.step()
        seconds.append(time.perf_counter() - start)
    return {'method': method, 'step_seconds': statistics.median(seconds),
            'load_average': os.getloadavg()[0]}


def memory_probe(args: argparse.Namespace) -> None:
    """:func:`measure_step_time` (``--timing``) or :func:`measure_memory` in this process,
    printed as one JSON line."""
    if args.timing:
        result = measure_step_time(args.model, args.method, args.batch, args.image_size,
                                   args.steps)
    else:
        result = measure_memory(args.model, args.method, args.batch, args.image_size)
    print(json.dumps(result))


def _run_memory_probe(method: str, args: argparse.Namespace, timing: bool = False) -> Dict:
    """:func:`memory_probe` in a fresh process: one whose freed memory leaves its RSS at once,
    or (``timing``) one with the default allocator."""
    status, lines, err = _run_script(
        ['_memory_probe', '--model', args.model, '--method', method, '--batch', str(args.batch),
         '--image-size', str(args.image_size), '--steps', str(args.steps)]
        + (['--timing'] if timing else []), release_freed=not timing)
    if status or not lines:
        raise RuntimeError(f'{args.model} {method} failed:\n{err}')
    return lines[-1]


def _memory_cells(row: Dict, base: Dict) -> List[str]:
    """A row of the memory table: figures and ratios to ``base`` (FP32), '-' if unsupported."""
    if 'unsupported' in row:
        return [row['method'], *['-'] * 8, row['unsupported']]
    mib = [row['rss_bytes'], row['counted_bytes'], row['generic_bytes'], row['peak_bytes']]
    return [row['method'], *(f'{v / 2**20:.1f}' for v in mib),
            f"{base['rss_bytes'] / max(row['rss_bytes'], 1):.2f}x",
            f"{base['counted_bytes'] / max(row['counted_bytes'], 1):.2f}x",
            f"{row['step_seconds']:.2f}", f"{row['step_seconds'] / base['step_seconds']:.2f}x",
            f"{row['load_average']:.1f}"]


def _memory_study(args: argparse.Namespace) -> Dict:
    """Each method of ``args.methods`` on ``args.model`` in two fresh processes (memory, step
    time); prints the table; returns the result (without saving it)."""
    spec = BENCH_MODELS[args.model]
    load = [os.getloadavg()[0]]  # step times are only comparable on an otherwise idle machine
    rows = []
    for method in args.methods:
        row = _run_memory_probe(method, args)
        if 'unsupported' not in row:
            row.update(_run_memory_probe(method, args, timing=True))
        rows.append(row)
        print(f'  {args.model} {method}: ' + (row.get('unsupported') or (
            f"RSS {row['rss_bytes'] / 2**20:.1f} MiB, counted "
            f"{row['counted_bytes'] / 2**20:.1f} MiB ({row['generic_bytes'] / 2**20:.1f} "
            f"compressed in generic mode), peak {row['peak_bytes'] / 2**20:.1f} MiB, step "
            f"{row['step_seconds']:.2f} s, load {row['load_average']:.1f}")), flush=True)
    load.append(os.getloadavg()[0])
    measured = [r for r in rows if 'unsupported' not in r]
    base = next((r for r in measured if r['method'] == 'FP32'), measured[0])
    print(f'{spec.title}, batch {args.batch}, {args.image_size}x{args.image_size}, '
          f'{torch.get_num_threads()} threads, load average {load[0]:.1f} at the start, '
          f'{load[1]:.1f} at the end; activation memory held after the forward pass, peak of '
          f'a step above the model, gradients, optimizer state and batch; ratios to '
          f'{base["method"]}')
    header = ['method', 'RSS MiB', 'counted MiB', 'generic MiB', 'peak MiB', 'less (RSS)',
              'less (counted)', 'step s', 'step time', 'load']
    print(' | '.join(f'{h:>11}' for h in header))
    for r in rows:
        print(' | '.join(f'{c:>11}' for c in _memory_cells(r, base)))
    for r in measured:
        if r['untrained_params'] > base['untrained_params']:
            print(f"{r['method']}: {r['untrained_params']:,} trainable parameters (elements) got "
                  f"no gradient ({base['method']}: {base['untrained_params']:,})")
    if {'L4', 'L5'} & set(args.methods):
        print('L4 and L5 differ from L3 on CUDA only (swap to CPU memory, allocator setting).')
    return {'model': args.model, 'title': spec.title, 'batch': args.batch,
            'image_size': args.image_size, 'threads': torch.get_num_threads(),
            'load_average': load, 'rows': rows}


def memory(args: argparse.Namespace) -> Dict:
    """Activation memory after the forward pass and step time of each method, side by side."""
    spec = BENCH_MODELS[args.model]
    args.batch = args.batch or spec.batch
    args.image_size = args.image_size or spec.image_size
    result = _memory_study(args)
    print('saved', _save(f'memory_{args.model}', result))
    return result


def _pareto_front(rows: List[Dict]) -> List[str]:
    """The methods that no other method beats in activation memory (RSS) and step time both."""
    points = {r['method']: (r['rss_bytes'], r['step_seconds']) for r in rows
              if 'unsupported' not in r}
    return [m for m, (mem, sec) in points.items() if not any(
        o_mem <= mem and o_sec <= sec and (o_mem, o_sec) != (mem, sec)
        for o_mem, o_sec in points.values())]


def _plot_pareto(result: Dict) -> str:
    """Per model: activation memory (filled) and peak (hollow) against step time, per method;
    the Pareto front (memory against time) in blue, joined by a line."""
    plt = _pyplot()
    entries = list(result['models'].values())
    cols = min(4, len(entries))
    fig, axes = plt.subplots(math.ceil(len(entries) / cols), cols, figsize=(4.5 * cols,
                             4 * math.ceil(len(entries) / cols)), squeeze=False)
    for ax, entry in zip(axes.flat, entries):
        measured = [r for r in entry['rows'] if 'unsupported' not in r]
        for r in measured:
            color = 'C0' if r['method'] in entry['front'] else 'C7'
            ax.plot(r['step_seconds'], r['rss_bytes'] / 2**20, 'o', color=color)
            ax.plot(r['step_seconds'], r['peak_bytes'] / 2**20, 'o', color=color, mfc='none')
            ax.annotate(r['method'], (r['step_seconds'], r['rss_bytes'] / 2**20), fontsize=7,
                        xytext=(3, 3), textcoords='offset points')
        front = sorted((r['step_seconds'], r['rss_bytes'] / 2**20) for r in measured
                       if r['method'] in entry['front'])
        ax.plot(*zip(*front), '-', color='C0', alpha=0.5)
        ax.set_yscale('log')
        ax.set_xlabel('step time (s)')
        ax.set_ylabel('MiB')
        ax.set_title(f"{entry['title']}\nbatch {entry['batch']}, {entry['image_size']} px",
                     fontsize=9)
        ax.grid(True, which='both', alpha=0.3)
    for ax in axes.flat[len(entries):]:
        ax.axis('off')
    fig.suptitle('activation memory after the forward pass (filled), peak of a step (hollow); '
                 'blue: Pareto front', fontsize=10)
    return _save_figure(fig, 'pareto')


def pareto(args: argparse.Namespace) -> Dict:
    """Activation memory, peak memory and step time of every method on every model, and the
    methods no other beats in both memory and time (the Pareto front), per model.

    One batch size and image side for all models (small by default, for a CPU); the JSON is
    saved after each model.
    """
    result = {'batch': args.batch, 'image_size': args.image_size, 'methods': args.methods,
              'models': {}, 'failed': {}}
    for name in args.models:
        try:
            entry = _memory_study(argparse.Namespace(model=name, batch=args.batch,
                                                     image_size=args.image_size,
                                                     steps=args.steps, methods=args.methods))
        except RuntimeError as error:  # e.g. FP32 itself fails at this size: the others go on
            result['failed'][name] = str(error).splitlines()[-1]
            print(f'{name}: not measured: {result["failed"][name]}', flush=True)
            _save('pareto', result)
            continue
        entry['front'] = _pareto_front(entry['rows'])
        print(f"Pareto front (activation memory against step time): {', '.join(entry['front'])}",
              flush=True)
        result['models'][name] = entry
        _save('pareto', result)
    print('saved', _save('pareto', result), _plot_pareto(result) if result['models'] else '')
    return result


def _pyplot() -> types.ModuleType:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: 'Figure', name: str, directory: Optional[str] = None) -> str:
    """Save ``fig`` as ``<directory>/<name>.png`` (default: :data:`OUT_DIR`), close it, return
    the path."""
    directory = directory or OUT_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f'{name}.png')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    _pyplot().close(fig)
    return path


def _device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _cuda_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Mean seconds per call of ``fn`` over ``repeat`` calls, between two CUDA events."""
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def _wall_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Mean seconds per call of ``fn`` over ``repeat`` calls, by the wall clock."""
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


@dataclasses.dataclass(frozen=True)
class _Meter:
    """How memory and time are measured on one type of device (:func:`_meter`).

    Attributes:
        allocated: bytes held now.
        reset_peak: start a new peak at what is held now.
        peak: the most bytes held since the last reset.
        synchronize: wait for the device's queued work.
        seconds: ``(fn, n)`` -> mean seconds per call of ``fn`` over ``n`` calls.
    """

    allocated: Callable[[], int]
    reset_peak: Callable[[], None]
    peak: Callable[[], int]
    synchronize: Callable[[], None]
    seconds: Callable[[Callable[[], object], int], float]


def _meter(device: torch.device) -> _Meter:
    """On CUDA: the caching allocator's allocated bytes and CUDA events. On the CPU: the resident
    set (meaningful under ``MALLOC_MMAP_THRESHOLD_=65536``, see :func:`_run_script`), its high
    water mark VmHWM, and the wall clock."""
    if device.type == 'cuda':
        return _Meter(functools.partial(torch.cuda.memory_allocated, device),
                      functools.partial(torch.cuda.reset_peak_memory_stats, device),
                      functools.partial(torch.cuda.max_memory_allocated, device),
                      functools.partial(torch.cuda.synchronize, device), _cuda_seconds)
    return _Meter(_rss_bytes, _reset_peak_rss, _peak_rss_bytes, lambda: None, _wall_seconds)


class _TrainingMemory:
    """Memory a training step takes above what is held on entry, on one device (a context).

    On CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated on entry. On the CPU:
    the peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) above the resident set
    on entry; run under ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave it at once. On the
    CPU with a ``budget`` (bytes), a thread also watches the resident set and calls
    ``over_budget`` once (it may end the process) as soon as it passes the budget, as a CUDA
    allocation would fail.
    """

    def __init__(self, device: torch.device, budget: Optional[int] = None,
                 over_budget: Optional[Callable[[int], None]] = None) -> None:
        self.device = device
        self.meter = _meter(device)
        self.budget = budget
        self.over_budget = over_budget
        self.done = threading.Event()

    def __enter__(self) -> '_TrainingMemory':
        gc.collect()
        self.meter.synchronize()
        self.base = self.meter.allocated()
        self.meter.reset_peak()
        if self.device.type == 'cpu' and self.budget is not None:
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(0.002):
            used = self.meter.allocated() - self.base
            if used > self.budget:
                self.over_budget(used)
                return

    def peak(self) -> int:
        """Peak bytes above the start so far."""
        return self.meter.peak() - self.base


def maxbatch_probe(args: argparse.Namespace) -> None:
    """One method and batch size in a fresh process: 4 training steps, the median of the last 3
    timed.

    Prints one JSON line: the batch, whether the peak training memory (above the model, its
    gradients, the optimizer state and the batch) passed the budget (on CUDA also: allocation
    failed), that peak and images/s.
    """
    device = _device()
    budget = args.budget and args.budget * 2**20
    run = _training('resnet50', args.method, args.batch, args.image_size, device)
    run.init_state()

    def report(peak: int, seconds: Optional[float] = None) -> None:
        print(json.dumps({'batch': args.batch,
                          'oom': seconds is None or bool(budget and peak > budget),
                          'peak_bytes': peak,
                          'images_per_second': None if seconds is None
                          else args.batch / seconds}), flush=True)

    def over_budget(used: int) -> None:
        report(used)
        os._exit(0)

    with _TrainingMemory(device, budget, over_budget) as memory:
        def step() -> None:
            run.step()
            memory.meter.synchronize()

        try:
            seconds = _median_seconds(step, 3)  # a warm-up step, then timed ones
        except torch.cuda.OutOfMemoryError:
            seconds = None
        report(memory.peak(), seconds)


def _probe_batch(method: str, batch: int, args: argparse.Namespace) -> Dict:
    """Run :func:`maxbatch_probe` in a subprocess; a probe killed by the kernel (SIGKILL, e.g.
    its out-of-memory killer) counts as out of memory."""
    status, lines, err = _run_script(
        ['_maxbatch_probe', '--method', method, '--batch', str(batch), '--image-size',
         str(args.image_size)] + (['--budget', str(args.budget)] if args.budget else []),
        release_freed=True)  # so that the peak resident set is what training holds
    if status == -signal.SIGKILL:
        return {'batch': batch, 'oom': True, 'peak_bytes': None, 'images_per_second': None}
    if status or not lines:
        raise RuntimeError(f'{method} at batch {batch} failed:\n{err}')
    return lines[-1]


def _search_max_batch(probe: Callable[[int], Dict], start: int, max_batch: int,
                      tolerance: float, growth: float = 2.0) -> Dict:
    """Largest batch that fits: from ``start``, growing by ``growth`` up to the first size that
    does not fit (or shrinking down to the first that does), then bisection until the gap is
    within ``tolerance`` of the answer.

    Args:
        probe: a batch size -> ``{'batch', 'oom', 'peak_bytes', 'images_per_second'}``, where
            ``oom`` means it did not fit. It may raise TimeoutError to end the search early.
        start: the first size tried.
        max_batch: the largest size tried.
        tolerance: the share of the answer within which the search stops.
        growth: the factor between sizes before the first bisection.

    Returns:
        ``max_batch`` (0: none fits), ``first_oom`` (the smallest size tried that does not fit;
        None if none), ``tried`` (the probes, by size), ``images_per_second`` and ``peak_bytes``
        at ``max_batch``, and ``stopped`` (why the search ended early, else None).
    """
    tried: List[Dict] = []
    fits, oom, stopped = 0, None, None

    def fit(batch: int) -> bool:
        nonlocal fits, oom
        tried.append(probe(batch))
        if tried[-1]['oom']:
            oom = batch if oom is None else min(oom, batch)
        else:
            fits = max(fits, batch)
        return not tried[-1]['oom']

    try:
        batch = min(start, max_batch)
        if fit(batch):
            while oom is None and batch < max_batch:
                batch = min(max_batch, max(batch + 1, int(batch * growth)))
                fit(batch)
        else:
            while not fits and batch > 1:
                batch = min(batch - 1, max(1, int(batch / growth)))
                fit(batch)
        while fits and oom is not None and oom - fits > max(1, int(tolerance * fits)):
            fit((fits + oom) // 2)
    except TimeoutError as e:
        stopped = str(e)
    tried.sort(key=lambda r: r['batch'])
    best = next((r for r in tried if r['batch'] == fits), None)
    return {'max_batch': fits, 'first_oom': oom, 'tried': tried,
            'images_per_second': best and best['images_per_second'],
            'peak_bytes': best and best['peak_bytes'], 'stopped': stopped}


def _plot_throughput(ax: 'Axes', rows: List[Dict]) -> None:
    """Throughput vs batch size per method (a row of :func:`_search_max_batch` with its
    ``method``): a dot at each size that fits, a circle at the largest, an x at the first size
    out of memory (at the largest's throughput)."""
    for row in rows:
        fits = [r for r in row['tried'] if not r['oom']]
        line, = ax.plot([r['batch'] for r in fits], [r['images_per_second'] for r in fits],
                        marker='.', label=f"{row['method']}: max {row['max_batch']}")
        if fits:
            ax.plot(row['max_batch'], row['images_per_second'], 'o', color=line.get_color())
            if row['first_oom'] is not None:
                ax.plot(row['first_oom'], row['images_per_second'], 'x', color=line.get_color(),
                        markersize=9, markeredgewidth=2)
    ax.set_xscale('log', base=2)
    ax.xaxis.set_major_formatter('{x:.0f}')
    ax.set_xlabel('batch size')
    ax.set_ylabel('throughput (images/s)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()


def _plot_maxbatch(result: Dict) -> str:
    """:func:`_plot_throughput` of the maxbatch study."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    _plot_throughput(ax, result['rows'])
    budget = (f"{result['budget_mib']} MiB training-memory budget" if result['budget_mib']
              else 'device memory')
    ax.set_title(f"ResNet-50 {result['image_size']}x{result['image_size']} on "
                 f"{result['device']}, {budget} (x: out of memory)")
    return _save_figure(fig, 'maxbatch')


# L4 and L5 only differ from L3 on CUDA (swap to CPU memory, allocator setting).
MAXBATCH_METHODS = ('FP32', 'AMP', 'CP', 'L1', 'L2', 'L3')


def maxbatch(args: argparse.Namespace) -> Dict:
    """Largest batch under the memory budget and throughput at each batch tried, per method."""
    from tqdm import tqdm

    device = _device()
    if device.type == 'cpu' and not args.budget:
        args.budget = 512
    methods = args.methods or list(MAXBATCH_METHODS) + (['L4', 'L5'] if device.type == 'cuda'
                                                         else [])
    load = [os.getloadavg()[0]]  # throughput is only comparable on an otherwise idle machine
    rows = []
    for method in tqdm(methods, desc='maxbatch', unit='method'):
        with tqdm(desc=f'{method:>4}', unit='probe', leave=False) as bar:
            def probe(batch: int) -> Dict:
                bar.set_postfix(batch=batch)
                result = _probe_batch(method, batch, args)
                bar.update()
                return result

            rows.append({'method': method, **_search_max_batch(probe, args.start, args.max_batch,
                                                               args.tolerance)})
    load.append(os.getloadavg()[0])
    base = next((r['max_batch'] for r in rows if r['method'] == 'FP32'), 0)
    budget = (f'budget {args.budget} MiB of training memory (peak above model, gradients, '
              f'optimizer state and batch)' if args.budget else 'all device memory')
    print(f'mmpretrain ResNet-50 at {args.image_size}x{args.image_size} on {device.type}, '
          f'{torch.get_num_threads()} threads, {budget}; load average {load[0]:.1f} at the '
          f'start, {load[1]:.1f} at the end')
    print(f"{'method':>6} | {'max batch':>9} | {'x FP32':>7} | {'first OOM':>9} | "
          f"{'images/s':>8} | {'peak MiB':>8} | {'probes':>6}")
    for r in rows:
        ratio = f"{r['max_batch'] / base:.2f}x" if base else '-'
        oom = r['first_oom'] if r['first_oom'] is not None else f">{args.max_batch}"
        speed = f"{r['images_per_second']:.1f}" if r['images_per_second'] else '-'
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r['peak_bytes'] else '-'
        print(f"{r['method']:>6} | {r['max_batch']:>9} | {ratio:>7} | {oom:>9} | {speed:>8} | "
              f"{peak:>8} | {len(r['tried']):>6}")
    result = {'model': 'resnet50', 'device': device.type, 'image_size': args.image_size,
              'budget_mib': args.budget, 'threads': torch.get_num_threads(),
              'load_average': load, 'rows': rows}
    print('saved', _save('maxbatch', result), _plot_maxbatch(result))
    return result


@dataclasses.dataclass(frozen=True)
class VisionModel:
    """A torchvision classifier of the gpu study (which needs no OpenMMLab package).

    Attributes:
        title: its name in the printed table.
        build: the image side -> the model, untrained, with 1000 classes.
        stages: the model -> the modules that CP checkpoints one by one.
    """

    title: str
    build: Callable[[int], torch.nn.Module]
    stages: Callable[[torch.nn.Module], List[torch.nn.Module]]


def _resnet50(image_size: int) -> torch.nn.Module:
    import torchvision
    return torchvision.models.resnet50()


def _vit_b16(image_size: int) -> torch.nn.Module:
    import torchvision
    return torchvision.models.vit_b_16(image_size=image_size)


VISION_MODELS: Dict[str, VisionModel] = {
    'resnet50': VisionModel('ResNet-50 (torchvision)', _resnet50,
                            lambda m: [m.layer1, m.layer2, m.layer3, m.layer4]),
    'vit-b16': VisionModel('ViT-B/16 (torchvision)', _vit_b16, lambda m: list(m.encoder.layers)),
}
GPU_METHODS = ('FP32', 'AMP', 'CP', 'L2', 'L3', 'L4', 'L5')
# What the gpu study is for: (model, quantity of L3 against FP32, at least).
GPU_TARGETS = (('resnet50', 'activation_less', 12.0), ('resnet50', 'max_batch', 7.0),
               ('resnet50', 'speed_at_max', 0.85), ('vit-b16', 'activation_less', 10.0))
# Its ratios to FP32: name -> (meaning, phase, figure, whether the ratio is FP32's over it).
_RATIOS = {
    'activation_less': ('activation memory, x less than FP32', 'measure', 'activation_bytes',
                        True),
    'peak_less': ('peak memory of a step, x less than FP32', 'measure', 'peak_bytes', True),
    'speed': ('throughput at the measured batch, x FP32', 'measure', 'images_per_second', False),
    'max_batch': ('max batch, x FP32', 'maxbatch', 'max_batch', False),
    'speed_at_max': ("throughput at its max batch, x FP32's at its max batch", 'maxbatch',
                     'images_per_second', False)}


def _vision_loss(model: torch.nn.Module, batch: int, image_size: int,
                 device: torch.device) -> Callable[[], torch.Tensor]:
    """Cross-entropy of ``model`` on a batch of random images and labels on ``device``."""
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(1000, (batch,), device=device)
    return lambda: F.cross_entropy(model(images), labels)


def _vision_training(name: str, method: str, batch: int, image_size: int,
                     device: torch.device) -> _Training:
    """Model ``name`` of :data:`VISION_MODELS` set up by :func:`_method_training`; CP wraps each
    of its stages in ``torch.utils.checkpoint`` (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint
    spec = VISION_MODELS[name]

    def build(extras: FrozenSet[str]) -> torch.nn.Module:
        model = spec.build(image_size)
        if 'CP' in extras:
            for stage in spec.stages(model):
                stage.forward = functools.partial(checkpoint, stage.forward, use_reentrant=False)
        return model

    return _method_training(method, device, build, functools.partial(
        _vision_loss, batch=batch, image_size=image_size, device=device))


def _measure_training(run: _Training, meter: _Meter, batch: int, warmup: int,
                      steps: int) -> Dict:
    """Activation memory, peak memory and throughput of ``run`` (momentum buffers created).

    Returns:
        ``activation_bytes``: held after the forward pass above what was held before it (the
        model, its gradients, the optimizer state and the batch); ``state_bytes``: what was held
        before a step; ``peak_bytes``: the most held during a step; ``step_seconds`` and
        ``images_per_second``: over ``steps`` steps after ``warmup`` steps.
    """
    for _ in range(warmup):
        run.step()
    run.optimizer.zero_grad(set_to_none=False)
    gc.collect()
    meter.synchronize()
    before = meter.allocated()
    loss = run.forward()
    activation = meter.allocated() - before
    run.update(loss)
    del loss
    gc.collect()
    meter.synchronize()
    state = meter.allocated()
    meter.reset_peak()
    run.step()
    meter.synchronize()
    peak = meter.peak()
    seconds = meter.seconds(run.step, steps)
    return {'activation_bytes': activation, 'state_bytes': state, 'peak_bytes': peak,
            'step_seconds': seconds, 'images_per_second': batch / seconds}


def _probe_vision_batch(run: _Training, meter: _Meter,
                        make_loss: Callable[[int], Callable[[], torch.Tensor]],
                        batch: int, budget: int, steps: int) -> Dict:
    """Train ``run`` on a batch of ``batch``: a first step, then ``steps`` timed. It does not
    fit when an allocation fails or the peak of the steps passes ``budget`` (bytes)."""
    seconds = None
    meter.reset_peak()
    try:
        run.loss = make_loss(batch)
        run.step()  # the first step at this size: its peak counts too
        seconds = meter.seconds(run.step, steps)
    except torch.cuda.OutOfMemoryError:
        pass
    finally:
        run.loss = None
        gc.collect()
        torch.cuda.empty_cache()  # a no-op without CUDA
    peak = meter.peak()
    return {'batch': batch, 'oom': seconds is None or peak > budget, 'peak_bytes': peak,
            'images_per_second': seconds and batch / seconds}


def _profile_step(run: _Training, device: torch.device, path: str) -> Dict:
    """Profile one training step with torch.profiler: a gzipped Chrome trace (``path``.json.gz)
    and the ops' table (``path``.txt).

    Returns:
        ``kernels`` (CUDA kernels and copies run), ``kernel_busy_ms`` (the union of their
        intervals), ``kernel_span_ms`` (first start to last end) and ``busy_fraction``: the
        GPU is idle for the rest of the span (launch gaps, host work, synchronizations).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == 'cuda'
    synchronize = _meter(device).synchronize
    run.step()
    synchronize()
    with profile(activities=[ProfilerActivity.CPU]
                 + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run.step()
        synchronize()
    prof.export_chrome_trace(f'{path}.json.gz')
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, -math.inf
    for start, stop in intervals:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = intervals[-1][1] - intervals[0][0] if intervals else 0.0
    summary = {'kernels': len(intervals), 'kernel_busy_ms': busy / 1e3,
               'kernel_span_ms': span / 1e3, 'busy_fraction': busy / span if span else None}
    with open(f'{path}.txt', 'w') as f:
        f.write(json.dumps(summary) + '\n' + prof.key_averages().table(
            sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=40))
    return summary


def gpu_probe(args: argparse.Namespace) -> None:
    """One model and method in this process: :func:`_measure_training` at ``--batch``, then
    (``--maxbatch``) the largest batch under the budget. Prints a JSON line after each phase.

    The search starts just below the batch whose peak would reach the budget if the peak grew
    linearly with the batch, and stops before a probe that would end after ``--deadline``.
    """
    device = torch.device(args.device)
    meter = _meter(device)
    run = _vision_training(args.model, args.method, args.batch, args.image_size, device)
    run.init_state()
    measured = _measure_training(run, meter, args.batch, args.warmup, args.steps)
    measured['phase'] = 'measure'
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        measured.update(device_name=props.name, device_bytes=props.total_memory)
    if args.profile_dir:
        measured['profile'] = _profile_step(
            run, device, os.path.join(args.profile_dir, f'profile_{args.model}_{args.method}'))
    print(json.dumps(measured), flush=True)
    if not args.maxbatch:
        return
    budget = _gpu_budget(args.budget_gb, device)
    per_image = measured['step_seconds'] / args.batch
    make_loss = functools.partial(_vision_loss, run.model, image_size=args.image_size,
                                  device=device)

    def probe(batch: int) -> Dict:
        needs = (1 + args.probe_steps) * batch * per_image
        if time.time() + needs > args.deadline:
            raise TimeoutError(f'time limit: batch {batch} would take about {needs:.0f} s')
        return _probe_vision_batch(run, meter, make_loss, batch, budget, args.probe_steps)

    held = measured['state_bytes']
    start = int(0.9 * args.batch * (budget - held) / max(measured['peak_bytes'] - held, 1))
    print(json.dumps({'phase': 'maxbatch', 'method': args.method, 'budget_bytes': budget,
                      **_search_max_batch(probe, max(1, start), args.max_batch, args.tolerance,
                                          growth=1.25)}), flush=True)


def _gpu_budget(budget_gb: Optional[float], device: torch.device) -> int:
    """The peak-memory budget in bytes: ``budget_gb`` GiB, by default 40 GiB but at most 90% of
    the device's memory."""
    if budget_gb:
        return int(budget_gb * 2**30)
    if device.type != 'cuda':
        raise ValueError('a budget (--budget-gb) is needed off CUDA')
    return min(40 * 2**30, int(0.9 * torch.cuda.get_device_properties(device).total_memory))


def _gpu_plan(models: List[str], methods: List[str],
              maxbatch: bool) -> List[Tuple[str, str, bool]]:
    """The gpu study's work, most important first: (model, method, whether to search the max
    batch). The first model's FP32 and L3 with their max batches; then measurements of the other
    models' FP32 and L3 and of the other methods; then the other max batches."""
    key = [m for m in ('FP32', 'L3') if m in methods]
    pairs = sorted(((model, method) for model in models for method in methods),
                   key=lambda p: (p[1] not in key, models.index(p[0]), methods.index(p[1])))
    first = [(models[0], m) for m in key]
    rest = [p for p in pairs if p not in first]
    return ([(*p, maxbatch) for p in first] + [(*p, False) for p in rest]
            + ([(*p, True) for p in rest] if maxbatch else []))


def _gpu_ratios(row: Dict, base: Optional[Dict]) -> Dict[str, Optional[float]]:
    """The ratios of :data:`_RATIOS` of ``row`` to ``base`` (FP32); None where either lacks the
    figure."""
    def figure(r: Optional[Dict], phase: str, key: str) -> Optional[float]:
        return ((r or {}).get(phase) or {}).get(key)

    ratios = {}
    for name, (_, phase, key, inverse) in _RATIOS.items():
        mine, theirs = figure(row, phase, key), figure(base, phase, key)
        if inverse:
            mine, theirs = theirs, mine
        ratios[name] = mine / theirs if mine is not None and theirs else None
    return ratios


def _gpu_cells(row: Dict, ratios: Dict[str, Optional[float]]) -> List[str]:
    """A row of the gpu table: figures, each with its ratio to FP32 beside it."""
    measured, search = row.get('measure') or {}, row.get('maxbatch') or {}

    def cell(value: Optional[float], fmt: str, ratio: Optional[float] = None) -> str:
        text = '-' if value is None else format(value, fmt)
        return text if ratio is None else f'{text} ({ratio:.2f}x)'

    mib = {k: measured[k] / 2**20 if k in measured else None
           for k in ('activation_bytes', 'peak_bytes')}
    most = search.get('max_batch')
    return [row['method'], cell(mib['activation_bytes'], '.0f', ratios['activation_less']),
            cell(mib['peak_bytes'], '.0f', ratios['peak_less']),
            cell(measured.get('images_per_second'), '.0f', ratios['speed']),
            cell(most, 'd', ratios['max_batch']) + ('*' if search.get('stopped') else ''),
            cell(search.get('images_per_second'), '.0f', ratios['speed_at_max'])]


def _gpu_report(result: Dict) -> None:
    """Print the gpu study's tables (ratios to FP32 beside the figures) and its targets; store
    the targets' outcome in ``result['targets']``."""
    budget = result.get('budget_bytes')
    print(f"{result.get('device_name', result['device'])}, torch {result['torch']}; batch "
          f"{result['batch']}, {result['image_size']}x{result['image_size']}; max batch under "
          + (f'{budget / 2**30:.1f} GiB of peak memory' if budget else 'no budget (not searched)')
          + f"; {result['elapsed_s']:.0f} s")
    header = ['method', 'activation MiB', 'peak MiB', 'images/s', 'max batch',
              'images/s at max']
    for entry in result['models'].values():
        rows, base = entry['rows'], entry['rows'].get('FP32')
        print(f"{entry['title']} (ratios to FP32; *: search stopped at the time limit)")
        print(' | '.join(f'{h:>17}' for h in header))
        for row in rows.values():
            print(' | '.join(f'{c:>17}' for c in _gpu_cells(row, _gpu_ratios(row, base)))
                  + (f" | {row['error']}" if 'error' in row else ''))
    result['targets'] = []
    for name, quantity, least in GPU_TARGETS:
        entry = result['models'].get(name)
        value = entry and _gpu_ratios(entry['rows'].get('L3', {}), entry['rows'].get('FP32'))[
            quantity]
        result['targets'].append({'model': name, 'quantity': quantity, 'target': least,
                                  'value': value, 'met': value is not None and value >= least})
        print(f"target {VISION_MODELS[name].title} L3 {_RATIOS[quantity][0]} >= {least}: "
              + ('not measured' if value is None else
                 f"{value:.2f} ({'met' if value >= least else 'NOT met'})"))
    if result['skipped']:
        print('skipped at the time limit:', '; '.join(result['skipped']))


def _gpu_progress(row: Dict) -> str:
    """What one process of the gpu study found, in a line."""
    if 'error' in row:
        return row['error']
    done = []
    if 'measure' in row:
        m = row['measure']
        done.append(f"activation {m['activation_bytes'] / 2**20:.0f} MiB, peak "
                    f"{m['peak_bytes'] / 2**20:.0f} MiB, {m['images_per_second']:.0f} images/s")
    if 'maxbatch' in row:
        found = row['maxbatch']
        done.append(f"max batch {found['max_batch']} at {found['images_per_second'] or 0:.0f} "
                    f"images/s" + (f" ({found['stopped']})" if found['stopped'] else ''))
    return '; '.join(done) or 'nothing measured'


def _plot_gpu(result: Dict, directory: str) -> Optional[str]:
    """Throughput against batch size, one panel per model with max-batch searches; None if
    there is none."""
    panels = [(entry['title'], [row['maxbatch'] for row in entry['rows'].values()
                                if row.get('maxbatch')])
              for entry in result['models'].values()]
    panels = [(title, rows) for title, rows in panels if rows]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5), squeeze=False)
    for ax, (title, rows) in zip(axes.flat, panels):
        _plot_throughput(ax, rows)
        ax.set_title(f"{title} {result['image_size']} px, {result.get('device_name', 'cpu')}, "
                     f"{result['budget_bytes'] / 2**30:.1f} GiB peak budget (x: does not fit)",
                     fontsize=9)
    return _save_figure(fig, 'gpu', directory)


# Seconds below which no new process is started (start-up, model, a measurement); seconds the
# study keeps for its report; seconds a search's last probe keeps before its process is killed.
_MIN_ITEM_SECONDS = 12.0
_REPORT_SECONDS = 5.0
_PROBE_SLACK_SECONDS = 5.0


def gpu(args: argparse.Namespace) -> Dict:
    """Activation memory, peak memory, throughput and the largest batch under a peak-memory
    budget, per model and method, each (model, method) in a fresh process (so that L5's
    allocator setting applies and nothing leaks between methods).

    The work runs most important first (:func:`_gpu_plan`) within ``--time-limit``; the JSON is
    saved after each process; what did not fit in the time is listed as skipped.
    """
    started = time.time()
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('gpu: no CUDA device (--device cpu runs the same logic on the CPU)')
    os.makedirs(args.out, exist_ok=True)
    deadline = (started + args.time_limit - _REPORT_SECONDS if args.time_limit else math.inf)
    maxbatch = device.type == 'cuda' or bool(args.budget_gb)
    result = {'device': device.type, 'torch': torch.__version__, 'batch': args.batch,
              'image_size': args.image_size, 'warmup': args.warmup, 'steps': args.steps,
              'probe_steps': args.probe_steps, 'time_limit_s': args.time_limit,
              'budget_bytes': args.budget_gb and int(args.budget_gb * 2**30),
              'models': {name: {'title': VISION_MODELS[name].title, 'rows': {}}
                         for name in args.models},
              'skipped': [], 'elapsed_s': 0.0}
    common = ['--device', args.device, '--batch', str(args.batch), '--image-size',
              str(args.image_size), '--warmup', str(args.warmup), '--steps', str(args.steps),
              '--probe-steps', str(args.probe_steps), '--max-batch', str(args.max_batch),
              '--tolerance', str(args.tolerance),
              '--deadline', str(deadline - _PROBE_SLACK_SECONDS)]
    if args.budget_gb:
        common += ['--budget-gb', str(args.budget_gb)]
    for model, method, search in _gpu_plan(args.models, args.methods, maxbatch):
        what = f"{model} {method} {'max batch' if search else 'measurement'}"
        left = deadline - time.time()
        if left < _MIN_ITEM_SECONDS:
            result['skipped'].append(what)
            continue
        row = result['models'][model]['rows'].setdefault(method, {'method': method})
        profile = args.profile and method == 'L3' and 'measure' not in row
        status, lines, err = _run_script(
            ['_gpu_probe', '--model', model, '--method', method, *common]
            + (['--maxbatch'] if search else []) + (['--profile-dir', args.out] if profile else []),
            release_freed=device.type == 'cpu', timeout=None if math.isinf(left) else left)
        for line in lines:
            phase = line.pop('phase')
            if phase == 'maxbatch' or phase not in row:  # the first measurement stays
                row[phase] = line
            result.update({k: line[k] for k in ('device_name', 'device_bytes', 'budget_bytes')
                           if k in line})
        if status is None:
            result['skipped'].append(f'{what} (killed at the time limit)')
        elif status:
            row['error'] = err.strip().splitlines()[-1] if err.strip() else f'exit {status}'
        print(f'[{time.time() - started:4.0f} s] {what}: {_gpu_progress(row)}', flush=True)
        result['elapsed_s'] = time.time() - started
        _save('gpu', result, args.out)
    result['elapsed_s'] = time.time() - started
    _gpu_report(result)
    try:
        plot = _plot_gpu(result, args.out)
    except ImportError as e:
        plot = f'no plot ({e})'
    print('saved', _save('gpu', result, args.out), plot or '')
    return result


def _parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per study, and the hidden probes they run."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = parser.add_subparsers(dest='study', required=True)
    p = studies.add_parser('codec', help='codec throughput vs the reference and a memory copy')
    p.add_argument('--shape', type=int, nargs='+', default=[64, 64, 56, 56])
    p.add_argument('--repeat', type=int, default=7)
    p.add_argument('--ref-repeat', type=int, default=2)
    p.set_defaults(run=codec)
    for name, run in (('memory', memory), ('_memory_probe', memory_probe)):
        p = studies.add_parser(name, help='activation memory and step time per method'
                               if name == 'memory' else argparse.SUPPRESS)
        p.add_argument('--model', choices=BENCH_MODELS, default='resnet50')
        p.add_argument('--batch', type=int, help="default: the model's (BENCH_MODELS)")
        p.add_argument('--image-size', type=int, help="default: the model's (BENCH_MODELS)")
        p.add_argument('--steps', type=int, default=3, help='timed training steps')
        if name == 'memory':
            p.add_argument('--methods', nargs='+', type=method_spec, default=list(METHODS),
                           help=f'of {", ".join(METHODS)}; a level may name its bits '
                                f'(L3{BUDGET}1.5)')
        else:
            p.add_argument('--method', type=method_spec, required=True)
            p.add_argument('--timing', action='store_true')
        p.set_defaults(run=run)
    p = studies.add_parser('pareto', help='activation memory, peak and step time of every '
                           'method on every model, and the Pareto front per model')
    p.add_argument('--models', nargs='+', choices=BENCH_MODELS, default=list(BENCH_MODELS))
    p.add_argument('--methods', nargs='+', choices=METHODS,
                   default=[m for m in METHODS if m not in ('L0', 'L4', 'L5')],
                   help='default: all but L0 (the FP32 model) and L4, L5 (L3 on the CPU)')
    p.add_argument('--batch', type=int, default=2, help='for every model')
    p.add_argument('--image-size', type=int, default=128, help='for every model')
    p.add_argument('--steps', type=int, default=2, help='timed training steps')
    p.set_defaults(run=pareto)
    for name, run in (('maxbatch', maxbatch), ('_maxbatch_probe', maxbatch_probe)):
        p = studies.add_parser(name, help='largest batch under a memory budget, and throughput'
                               if name == 'maxbatch' else argparse.SUPPRESS)
        p.add_argument('--budget', type=int,
                       help='MiB of training memory: the peak above what the model, its '
                       'gradients, the optimizer state and the batch hold (default: 512 on the '
                       'CPU, the device memory on CUDA)')
        p.add_argument('--image-size', type=int, default=64)
        if name == 'maxbatch':
            p.add_argument('--methods', nargs='+', choices=METHODS,
                           help=f'default: {" ".join(MAXBATCH_METHODS)}, and L4 L5 on CUDA')
            p.add_argument('--start', type=int, default=8, help='first batch size tried')
            p.add_argument('--max-batch', type=int, default=16384, help='largest batch tried')
            p.add_argument('--tolerance', type=float, default=0.05,
                           help='bisection stops when the gap is within this share of the answer')
        else:
            p.add_argument('--method', choices=METHODS, required=True)
            p.add_argument('--batch', type=int, required=True)
        p.set_defaults(run=run)
    gpu_methods = ('FP32', 'AMP', 'CP') + LEVELS
    for name, run in (('gpu', gpu), ('_gpu_probe', gpu_probe)):
        p = studies.add_parser(name, help='torchvision models on a CUDA device: activation and '
                               'peak memory, throughput, max batch under a peak budget'
                               if name == 'gpu' else argparse.SUPPRESS)
        p.add_argument('--device', default='cuda',
                       help="'cpu' runs the same logic on the CPU (resident set, wall clock)")
        p.add_argument('--budget-gb', type=float,
                       help='GiB of peak memory (model included) for the max-batch search '
                       '(default on CUDA: 40, at most 90%% of the device; none on the CPU)')
        p.add_argument('--batch', type=int, default=64, help='batch of the measurement')
        p.add_argument('--image-size', type=int, default=224)
        p.add_argument('--warmup', type=int, default=3, help='steps before the measurement')
        p.add_argument('--steps', type=int, default=10, help='timed steps of the measurement')
        p.add_argument('--probe-steps', type=int, default=2,
                       help='timed steps per batch size tried, after a first one')
        p.add_argument('--max-batch', type=int, default=65536, help='largest batch tried')
        p.add_argument('--tolerance', type=float, default=0.05,
                       help='the search stops when the gap is within this share of the answer')
        if name == 'gpu':
            p.add_argument('--out', default=OUT_DIR, help='folder of the JSON, plot and trace')
            p.add_argument('--models', nargs='+', choices=VISION_MODELS,
                           default=list(VISION_MODELS))
            p.add_argument('--methods', nargs='+', choices=gpu_methods,
                           default=list(GPU_METHODS))
            p.add_argument('--time-limit', type=float, default=180.0,
                           help='seconds for the whole study (0: none)')
            p.add_argument('--profile', action='store_true',
                           help='also a torch.profiler trace and summary of one L3 step')
        else:
            p.add_argument('--model', choices=VISION_MODELS, required=True)
            p.add_argument('--method', choices=gpu_methods, required=True)
            p.add_argument('--maxbatch', action='store_true')
            p.add_argument('--deadline', type=float, default=math.inf,
                           help='time.time() after which no search probe may end')
            p.add_argument('--profile-dir')
        p.set_defaults(run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = _parser().parse_args(argv)
    args.run(args)


if __name__ == '__main__':
    main()
