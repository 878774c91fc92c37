"""Benchmarks, each figure measured side by side in one run.

    python tools/benchmark.py codec  [--shape 64 64 56 56]
    python tools/benchmark.py memory [--model vit-b16 --batch 16 --image-size 224 --methods FP32 L3]
    python tools/benchmark.py maxbatch [--budget 512 --image-size 64 --methods FP32 AMP CP L3]

Results are printed as a table and saved as JSON (maxbatch also a PNG plot) under work_dirs/bench/.
memory's models (--model) are in BENCH_MODELS: mmpretrain's ResNet-50, ViT-B/16 and Swin-T, and the
OpenMMLab presets of configs/actnn/ (faster-rcnn, retinanet, fcn, fpn, mocov2).
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import types
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Union

import torch
from tqdm import tqdm

from actnn_mm.compress import dequantize, extension_loaded, quantize, reference
from actnn_mm.compress.codec import samples_view
from actnn_mm.config import LEVELS
from actnn_mm.generic import GenericStats

if TYPE_CHECKING:
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


def _save(name: str, result: Dict) -> str:
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f'{name}.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    return path


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
                lambda: reference.dequantize(c.data, c.meta, c.bits, c.offsets, n, m,
                                             c.group_size, x.dtype), args.ref_repeat),
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


def _build(name: str, image_size: int, with_cp: bool) -> torch.nn.Module:
    """Model ``name`` of :data:`BENCH_MODELS` with plain torch layers, untrained.

    The config's model as a Runner builds and initializes it (the top-level data preprocessor as
    default; a detection head's prior-probability bias keeps its first losses, and so the steps
    that follow, finite), without pretrained weights; a transformer's position embedding and
    the segmentation preprocessor's padding are sized for ``image_size``. Layers a preset builds
    as ActNN layers are reverted, so every method starts from the upstream model.

    Raises:
        Unsupported: ``with_cp`` and the backbone takes no such argument.
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
    if with_cp:
        model_cfg.backbone.with_cp = True
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        try:
            model = MODELS.build(model_cfg)
        except TypeError as e:
            if with_cp and 'with_cp' in str(e):
                raise Unsupported(f'{model_cfg.backbone.type} takes no with_cp') from e
            raise
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # not the report of every parameter's initialization
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return actnn_mm.revert(model)


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


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


METHODS = ('FP32', 'AMP', 'CP', 'L0', 'L1', 'L2', 'L3', 'L4', 'L5')


@dataclasses.dataclass
class _Training:
    """A model set up to train with one method on one random batch.

    Attributes:
        model: the model (converted for the L levels, ``with_cp=True`` for CP).
        optimizer: SGD with momentum over its parameters.
        forward: computes the loss of the batch (under autocast for AMP, in generic mode at L3+).
        step: one training step (zero grads, forward, backward, optimizer step).
        generic: the generic-mode context the forward runs in (L3 and above), else None.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[], torch.Tensor]
    step: Callable[[], None]
    generic: Optional['compress_saved_tensors']


def _training(name: str, method: str, batch: int, image_size: int,
              device: torch.device) -> _Training:
    """Build model ``name``, optimizer, batch and step of ``method`` (one of :data:`METHODS`).

    The batch goes through the model's data preprocessor once (in training mode, with its batch
    augments); each forward computes the model's losses on it and sums them, as a training step
    does. AMP autocasts to bfloat16 on the CPU and float16 on CUDA. The level is set before the
    model touches the device, so L5's allocator setting takes effect; from L3 on, the forward
    also runs in generic mode, as :class:`~actnn_mm.mm.ActNNHook` does.

    Raises:
        Unsupported: the model cannot run ``method``.
    """
    import actnn_mm

    level = method if method in LEVELS else None
    if level:
        actnn_mm.set_optimization_level(level)
    torch.manual_seed(0)
    model = _build(name, image_size, with_cp=method == 'CP').to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if level:
        actnn_mm.QModule(model)
    generic = (actnn_mm.compress_saved_tensors(model)
               if level and LEVELS.index(level) >= LEVELS.index('L3') else None)
    data = model.data_preprocessor(BENCH_MODELS[name].make_batch(batch, image_size),
                                   training=True)
    autocast = torch.autocast(device.type, enabled=method == 'AMP',
                              dtype=torch.bfloat16 if device.type == 'cpu' else torch.float16)

    def forward() -> torch.Tensor:
        with autocast, generic or contextlib.nullcontext():
            return model.parse_losses(model(**data, mode='loss'))[0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        forward().backward()
        optimizer.step()

    return _Training(model, optimizer, forward, step, generic)


def _warmed_up(name: str, method: str, batch: int, image_size: int) -> Union[_Training, Dict]:
    """The training of ``name`` by ``method`` after one step (so gradients and optimizer state
    exist), or ``{'method', 'unsupported'}`` when the model cannot run it: CP with a backbone
    without ``with_cp``, AMP through an op without a bfloat16 CPU kernel."""
    try:
        run = _training(name, method, batch, image_size, torch.device('cpu'))
        run.step()
    except Unsupported as e:
        return {'method': method, 'unsupported': str(e)}
    except RuntimeError as e:  # an op without a bfloat16 CPU kernel (e.g. mmcv's nms)
        if method != 'AMP':
            raise
        where = os.path.relpath(traceback.extract_tb(e.__traceback__)[-1].filename,
                                os.path.dirname(os.path.dirname(torch.__file__)))
        return {'method': method, 'unsupported': f'fails in {where}: {str(e).splitlines()[0]}'}
    gc.collect()
    return run


def measure_memory(name: str, method: str, batch: int, image_size: int) -> Dict:
    """Activation memory held after the forward pass of one training step.

    Run it in a fresh process under ``MALLOC_MMAP_THRESHOLD_=65536`` for a meaningful RSS.

    Returns:
        ``method``; ``rss_bytes``: RSS growth over the forward pass; ``counted_bytes``: what
        autograd saves outside generic mode (unique storages, parameters excluded) + what the
        ActNN layers hold + what generic mode keeps (``generic_bytes`` compressed,
        ``generic_kept_bytes`` left in full precision by reason, counted at each save). Only
        ``method`` and ``unsupported`` (the reason) when the model cannot run it.
    """
    from actnn_mm.layers.saved import held_bytes

    run = _warmed_up(name, method, batch, image_size)
    if isinstance(run, dict):
        return run
    counter = _SavedTensorCounter(list(run.model.parameters()))
    run.optimizer.zero_grad(set_to_none=False)
    before_rss, before_held = _rss_bytes(), held_bytes()
    with counter:  # outside generic mode, which the forward enters at L3+
        loss = run.forward()
    after_rss = _rss_bytes()
    generic = run.generic.stats if run.generic else GenericStats()
    kept = dict(generic.kept_bytes)
    counted = (counter.nbytes + held_bytes() - before_held + generic.saved_bytes
               + sum(kept.values()))
    loss.backward()
    run.optimizer.step()
    return {'method': method, 'rss_bytes': after_rss - before_rss, 'counted_bytes': counted,
            'generic_bytes': generic.saved_bytes, 'generic_kept_bytes': kept}


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
    env = dict(os.environ)
    env.pop('MALLOC_MMAP_THRESHOLD_', None)
    if not timing:
        env['MALLOC_MMAP_THRESHOLD_'] = '65536'
    cmd = [sys.executable, __file__, '_memory_probe', '--model', args.model, '--method', method,
           '--batch', str(args.batch), '--image-size', str(args.image_size),
           '--steps', str(args.steps)] + (['--timing'] if timing else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'{args.model} {method} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_cells(row: Dict, base: Dict) -> List[str]:
    """A row of the memory table: figures and ratios to ``base`` (FP32), '-' if unsupported."""
    if 'unsupported' in row:
        return [row['method'], '-', '-', '-', '-', '-', '-', '-', row['unsupported']]
    mib = [row['rss_bytes'] / 2**20, row['counted_bytes'] / 2**20, row['generic_bytes'] / 2**20]
    return [row['method'], *(f'{v:.1f}' for v in mib),
            f"{base['rss_bytes'] / max(row['rss_bytes'], 1):.2f}x",
            f"{base['counted_bytes'] / max(row['counted_bytes'], 1):.2f}x",
            f"{row['step_seconds']:.2f}", f"{row['step_seconds'] / base['step_seconds']:.2f}x",
            f"{row['load_average']:.1f}"]


def memory(args: argparse.Namespace) -> Dict:
    """Activation memory after the forward pass and step time of each method, side by side."""
    spec = BENCH_MODELS[args.model]
    args.batch = args.batch or spec.batch
    args.image_size = args.image_size or spec.image_size
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
            f"compressed in generic mode), step {row['step_seconds']:.2f} s, "
            f"load {row['load_average']:.1f}")), flush=True)
    load.append(os.getloadavg()[0])
    measured = [r for r in rows if 'unsupported' not in r]
    base = next((r for r in measured if r['method'] == 'FP32'), measured[0])
    print(f'{spec.title}, batch {args.batch}, {args.image_size}x{args.image_size}, '
          f'{torch.get_num_threads()} threads, load average {load[0]:.1f} at the start, '
          f'{load[1]:.1f} at the end; activation memory held after the forward pass, '
          f'ratios to {base["method"]}')
    header = ['method', 'RSS MiB', 'counted MiB', 'generic MiB', 'less (RSS)',
              'less (counted)', 'step s', 'step time', 'load']
    print(' | '.join(f'{h:>11}' for h in header))
    for r in rows:
        print(' | '.join(f'{c:>11}' for c in _memory_cells(r, base)))
    if {'L4', 'L5'} & set(args.methods):
        print('L4 and L5 differ from L3 on CUDA only (swap to CPU memory, allocator setting).')
    result = {'model': args.model, 'title': spec.title, 'batch': args.batch,
              'image_size': args.image_size, 'threads': torch.get_num_threads(),
              'load_average': load, 'rows': rows}
    print('saved', _save(f'memory_{args.model}', result))
    return result


def _pyplot() -> types.ModuleType:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig: 'Figure', name: str) -> str:
    """Save ``fig`` as ``work_dirs/bench/<name>.png``, close it, return the path."""
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f'{name}.png')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    _pyplot().close(fig)
    return path


def _device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


class _TrainingMemory:
    """Memory a training step takes above what is held on entry, on one device (a context).

    On CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated on entry. On the CPU:
    the peak resident set (VmHWM, reset through ``/proc/self/clear_refs``) above the resident set
    on entry; run under ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave it at once. On the
    CPU a thread also watches the resident set and calls ``over_budget`` once (it may end the
    process) as soon as it passes ``budget`` (bytes), as a CUDA allocation would fail.
    """

    def __init__(self, device: torch.device, budget: Optional[int],
                 over_budget: Callable[[int], None]) -> None:
        self.device = device
        self.budget = budget
        self.over_budget = over_budget
        self.done = threading.Event()

    def __enter__(self) -> '_TrainingMemory':
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self.budget is None:
            raise ValueError('a budget is needed on the CPU: nothing else stops the process')
        self.base = _rss_bytes()
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets the peak resident set
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(0.002):
            used = _rss_bytes() - self.base
            if used > self.budget:
                self.over_budget(used)
                return

    def peak(self) -> int:
        """Peak bytes above the start so far."""
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated(self.device) - self.base
        with open('/proc/self/status') as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
        return hwm_kib * 1024 - self.base


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
    for p in run.model.parameters():
        p.grad = torch.zeros_like(p)
    run.optimizer.step()  # zero gradients: creates the momentum buffers, changes no weight

    def report(peak: int, seconds: Optional[float] = None) -> None:
        print(json.dumps({'batch': args.batch,
                          'oom': seconds is None or bool(budget and peak > budget),
                          'peak_bytes': peak,
                          'images_per_second': None if seconds is None
                          else args.batch / seconds}), flush=True)

    def over_budget(used: int) -> None:
        report(used)
        os._exit(0)

    def step() -> None:
        run.step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    with _TrainingMemory(device, budget, over_budget) as memory:
        try:
            seconds = _median_seconds(step, 3)  # a warm-up step, then timed ones
        except torch.cuda.OutOfMemoryError:
            seconds = None
        report(memory.peak(), seconds)


def _probe_batch(method: str, batch: int, args: argparse.Namespace) -> Dict:
    """Run :func:`maxbatch_probe` in a subprocess; a probe killed by the kernel (SIGKILL, e.g.
    its out-of-memory killer) counts as out of memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')  # freed memory leaves RSS at once
    cmd = [sys.executable, __file__, '_maxbatch_probe', '--method', method, '--batch', str(batch),
           '--image-size', str(args.image_size)]
    if args.budget:
        cmd += ['--budget', str(args.budget)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode == -signal.SIGKILL:
        return {'batch': batch, 'oom': True, 'peak_bytes': None, 'images_per_second': None}
    if proc.returncode:
        raise RuntimeError(f'{method} at batch {batch} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _search_max_batch(method: str, args: argparse.Namespace) -> Dict:
    """Largest batch of ``method`` within the budget: doubling from ``--start`` up to the first
    out-of-memory size, then bisection until the gap is within ``--tolerance`` of the answer.
    0 if ``--start`` is out of memory already."""
    tried: List[Dict] = []
    fits, oom = 0, None
    with tqdm(desc=f'{method:>4}', unit='probe', leave=False) as bar:
        def probe(batch: int) -> bool:
            bar.set_postfix(batch=batch)
            tried.append(_probe_batch(method, batch, args))
            bar.update()
            return not tried[-1]['oom']

        batch = args.start
        while oom is None and batch <= args.max_batch:
            if probe(batch):
                fits, batch = batch, 2 * batch
            else:
                oom = batch
        while fits and oom is not None and oom - fits > max(1, int(args.tolerance * fits)):
            batch = (fits + oom) // 2
            if probe(batch):
                fits = batch
            else:
                oom = batch
    tried.sort(key=lambda r: r['batch'])
    best = next((r for r in tried if r['batch'] == fits), None)
    return {'method': method, 'max_batch': fits, 'first_oom': oom, 'tried': tried,
            'images_per_second': best and best['images_per_second'],
            'peak_bytes': best and best['peak_bytes']}


def _plot_maxbatch(result: Dict) -> str:
    """Throughput vs batch size per method: a dot at each size that fits, a circle at the
    largest, an x at the first size out of memory (at the largest's throughput)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result['rows']:
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
    budget = (f"{result['budget_mib']} MiB training-memory budget" if result['budget_mib']
              else 'device memory')
    ax.set_title(f"ResNet-50 {result['image_size']}x{result['image_size']} on "
                 f"{result['device']}, {budget} (x: out of memory)")
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    return _save_figure(fig, 'maxbatch')


# L4 and L5 only differ from L3 on CUDA (swap to CPU memory, allocator setting).
MAXBATCH_METHODS = ('FP32', 'AMP', 'CP', 'L1', 'L2', 'L3')


def maxbatch(args: argparse.Namespace) -> Dict:
    """Largest batch under the memory budget and throughput at each batch tried, per method."""
    device = _device()
    if device.type == 'cpu' and not args.budget:
        args.budget = 512
    methods = args.methods or list(MAXBATCH_METHODS) + (['L4', 'L5'] if device.type == 'cuda'
                                                         else [])
    load = [os.getloadavg()[0]]  # throughput is only comparable on an otherwise idle machine
    rows = [_search_max_batch(method, args)
            for method in tqdm(methods, desc='maxbatch', unit='method')]
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
        most = r['max_batch'] or f'<{args.start}'
        oom = r['first_oom'] if r['first_oom'] is not None else f">{args.max_batch}"
        speed = f"{r['images_per_second']:.1f}" if r['images_per_second'] else '-'
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r['peak_bytes'] else '-'
        print(f"{r['method']:>6} | {most:>9} | {ratio:>7} | {oom:>9} | {speed:>8} | "
              f"{peak:>8} | {len(r['tried']):>6}")
    result = {'model': 'resnet50', 'device': device.type, 'image_size': args.image_size,
              'budget_mib': args.budget, 'threads': torch.get_num_threads(),
              'load_average': load, 'rows': rows}
    print('saved', _save('maxbatch', result), _plot_maxbatch(result))
    return result


def main() -> None:
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
            p.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS))
        else:
            p.add_argument('--method', choices=METHODS, required=True)
            p.add_argument('--timing', action='store_true')
        p.set_defaults(run=run)
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
    args = parser.parse_args()
    args.run(args)


if __name__ == '__main__':
    main()
