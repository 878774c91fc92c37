"""`make demo`: the Faster R-CNN ActNN preset (L3) and the same network in full precision (FP32),
trained side by side (one process and one thread each) from the same seed on the same batches of
generated images; prints the activation memory each kept for backward and how its loss fell, and
plots the loss curves.

    python tools/demo.py [--iters 40] [--work-dir work_dirs/demo]

The config is ``configs/demo/faster_rcnn_r50_demo.py`` through ``tools/train.py``'s config
handling. FP32 is that config without its ``actnn`` key, with the ActNN layers it names in
``conv_cfg``/``norm_cfg`` reverted to torch's (:func:`actnn_mm.revert`): the upstream model. Both
runs start from the same weights and see the same images in the same order with the same flips
(checked); they differ in L3's rounding noise and, since the codec takes its seeds from torch's
generator, in the anchors and proposals that mmdet's samplers draw.
"""
import argparse
import itertools
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner

import actnn_mm
from actnn_mm.mm import compat_fixes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tools'))
from make_demo_data import make_coco  # noqa: E402
from train import build_config  # noqa: E402  (same flow as tools/train.py)

CONFIG = os.path.join(REPO, 'configs', 'demo', 'faster_rcnn_r50_demo.py')
DATA_ROOT = os.path.join('data', 'demo', 'coco')  # the config's data_root
IMAGES = 4  # training images: the network overfits them
MIB = 2**20


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts what autograd saves for backward while active: the bytes of each saved tensor's
    storage, once per storage, leaving out the model's parameters and buffers (held anyway).

    Args:
        model: the model whose parameters and buffers are left out.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        held = {t.untyped_storage().data_ptr()
                for t in itertools.chain(model.parameters(), model.buffers())}
        self.storages: Dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in held:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    @property
    def nbytes(self) -> int:
        """Bytes counted so far."""
        return sum(self.storages.values())


class Recorder(Hook):
    """Records each training iteration's loss and batch, and what the last one kept for backward.

    FP32 (``level`` 'FP32'): the tensors autograd saved (:class:`SavedTensorBytes`). ActNN:
    :func:`actnn_mm.stats` after the step (its ``compressed_bytes``, ``full_precision_bytes``
    and the bytes generic mode left in full precision).

    Args:
        level: 'FP32' or the ActNN level of the run, as printed.
        interval: print the loss every this many iterations.
    """

    priority = 'LOWEST'  # after the ActNNHook's after_train_iter

    def __init__(self, level: str, interval: int) -> None:
        self.level = level
        self.interval = interval
        self.losses: List[float] = []
        self.batches: List[List[Tuple[int, bool]]] = []
        self.kept: Dict[str, float] = {}
        self.seconds = 0.0
        self._saved: Optional[SavedTensorBytes] = None

    def before_train(self, runner: Runner) -> None:
        self.seconds = time.perf_counter()

    def before_train_iter(self, runner: Runner, batch_idx: int,
                          data_batch: Optional[Dict] = None) -> None:
        if self.level == 'FP32' and self.is_last_train_iter(runner):
            self._saved = SavedTensorBytes(runner.model)
            self._saved.__enter__()

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Optional[Dict] = None,
                         outputs: Optional[Dict] = None) -> None:
        self.losses.append(outputs['loss'].item())
        self.batches.append([(s.img_id, bool(s.flip)) for s in data_batch['data_samples']])
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self.kept = {'bytes': self._saved.nbytes}
            self._saved = None
        elif self.level != 'FP32' and self.is_last_train_iter(runner):
            step = actnn_mm.stats(runner.model)
            left = sum(step['generic']['uncompressed_bytes'].values())
            self.kept = {'bytes': step['compressed_bytes'] + left, 'left': left,
                         'compressed': step['compressed_bytes'],
                         'full': step['full_precision_bytes'], 'bits': step['average_bits']}
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            print(f'{self.level:<5} iteration {runner.iter + 1:>3}/{runner.max_iters}  '
                  f'loss {self.losses[-1]:.3f}  {time.perf_counter() - self.seconds:5.0f} s',
                  flush=True)

    def after_train(self, runner: Runner) -> None:
        self.seconds = time.perf_counter() - self.seconds


def train(level: str, iters: int, work_dir: str) -> Dict:
    """Train the demo config at ``level`` for ``iters`` iterations, on one thread.

    Args:
        level: 'FP32' (the config without ActNN) or 'L3' (the config as it is).
        iters: training iterations.
        work_dir: the run's log folder.

    Returns:
        The :class:`Recorder`'s ``losses``, ``batches``, ``kept`` and ``seconds``.
    """
    torch.set_num_threads(1)  # the tensors are small: more threads mostly wait
    options = {'train_cfg.max_iters': iters, 'log_level': 'WARNING',
               'env_cfg.mp_cfg.mp_start_method': 'spawn'}  # how main() started this process
    if level == 'FP32':
        options['actnn'] = None
    cfg = build_config(argparse.Namespace(
        config=CONFIG, cfg_options=options, launcher='none', work_dir=work_dir, amp=False,
        auto_scale_lr=False, resume=None))
    recorder = Recorder(level, interval=max(1, iters // 4))
    with compat_fixes(cfg.work_dir):
        runner = Runner.from_cfg(cfg)
        if level == 'FP32':
            actnn_mm.revert(runner.model)
        runner.register_hook(recorder)
        runner.train()
    return {'losses': recorder.losses, 'batches': recorder.batches, 'kept': recorder.kept,
            'seconds': recorder.seconds}


def plot(runs: Dict[str, Dict], window: int, title: str, path: str) -> None:
    """Save the loss per iteration of each run (faint) and its moving average over ``window``
    iterations as a PNG at ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for level, run in runs.items():
        iters = np.arange(1, len(run['losses']) + 1)
        smooth = np.convolve(run['losses'], np.ones(window) / window, mode='valid')
        line, = ax.plot(iters[window - 1:], smooth, label=f'{level} (mean of the last {window})')
        ax.plot(iters, run['losses'], color=line.get_color(), alpha=0.3, linewidth=0.8)
    ax.set_xlabel('iteration')
    ax.set_ylabel('training loss')
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=40, help='training iterations per run')
    parser.add_argument('--window', type=int, default=5,
                        help='iterations averaged for the start and end losses')
    parser.add_argument('--work-dir', default=os.path.join('work_dirs', 'demo'))
    args = parser.parse_args()
    started = time.perf_counter()
    os.chdir(REPO)
    make_coco(DATA_ROOT, IMAGES, 0, 128, seed=0)
    levels = ('FP32', 'L3')
    # one process per run, side by side, one thread each
    with ProcessPoolExecutor(len(levels), mp_context=multiprocessing.get_context('spawn')) as pool:
        results = pool.map(train, levels, [args.iters] * len(levels),
                           [os.path.join(args.work_dir, level.lower()) for level in levels])
        runs = dict(zip(levels, results))
    fp32, l3 = runs['FP32'], runs['L3']
    window = min(args.window, args.iters)
    title = (f'Faster R-CNN R50-FPN from scratch, {IMAGES} demo images at 128 px, batch 2, '
             f'{args.iters} iterations, same batches')
    path = os.path.join(args.work_dir, 'loss.png')
    plot(runs, window, title, path)

    loss_header = f'loss (first {window} -> last {window} iterations)'
    print(f'\n== actnn_mm demo: {title} ==')
    print(f"{'':6}{'activations kept':<26}{loss_header:<44}training time")
    for level, run in runs.items():
        kept = f"{run['kept']['bytes'] / MIB:7.1f} MiB"
        if run is l3:
            kept += f" ({fp32['kept']['bytes'] / l3['kept']['bytes']:.1f}x less)"
        start, end = np.mean(run['losses'][:window]), np.mean(run['losses'][-window:])
        print(f"{level:<6}{kept:<26}{f'{start:.2f} -> {end:.2f}':<44}{run['seconds']:.0f} s")
    print('activations kept: what the last iteration saved for backward, parameters left out\n'
          '  FP32: each saved storage once, measured with '
          'torch.autograd.graph.saved_tensors_hooks\n'
          f"  L3:   actnn_mm.stats(model): {l3['kept']['compressed'] / MIB:.1f} MiB compressed "
          f"({l3['kept']['bits']:.2f} bits per value on average)\n"
          f"        + {l3['kept']['left'] / MIB:.1f} MiB that generic mode left in full precision; "
          'the compressed ones stand for\n'
          f"        {l3['kept']['full'] / MIB:.1f} MiB in full precision as the layers count them "
          '(a ReLU output that the next\n'
          '        conv also keeps counts twice; FP32 saves it once)')
    same = 'the same' if fp32['batches'] == l3['batches'] else 'DIFFERENT'
    print(f'Both runs saw {same} {args.iters} batches (image ids and flips). L3 also differs by '
          "its rounding noise\nand by the RoI samplers' draws, which share torch's generator "
          'with it.')
    print(f'loss curves: {path}; logs: {args.work_dir}/fp32, {args.work_dir}/l3; '
          f'demo time {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
