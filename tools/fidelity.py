"""Fidelity of activation-compressed training on real data: scikit-learn's handwritten digits,
and the loss curves of the demo Faster R-CNN.

    python tools/fidelity.py gradient [--model resnet18 --image-size 64 --levels L1 L2 L3]
    python tools/fidelity.py convergence [--levels FP32 L2 L3 --seeds 0 1 2 --epochs 20]
    python tools/fidelity.py detection [--levels FP32 L3 --seeds 0 --iters 60]

``gradient``: for one fixed batch, the bias and variance of the gradient under each level against
the full-precision gradient, next to the minibatch (SGD) variance of the full-precision gradient,
as in ActNN's analysis: the variance of a compressed step is the SGD variance plus the
quantization variance, so the latter must be small next to the former. Per layer as well.

``convergence``: a small ResNet-style CNN trained on the digits with each level and several
seeds; the test accuracy (mean, spread) and loss curves per level.

``detection``: the Faster R-CNN preset on generated COCO-format demo data
(``configs/demo/faster_rcnn_r50_demo.py`` through ``tools/train.py``'s config handling), trained
from the same seed at each level; its losses per iteration. ``L3-nogeneric`` is L3 without
generic mode (``actnn=dict(level='L3', generic=False)``).

Each prints a table and saves JSON and a PNG plot under work_dirs/bench/. The digits (1797 8x8
images, 10 classes) ship with scikit-learn and the demo images are drawn, so nothing is
downloaded.
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision
from mmengine.hooks import Hook
from mmengine.runner import Runner
from torch import nn
from tqdm import tqdm

import actnn_mm
import benchmark
from actnn_mm.config import LEVELS
from benchmark import _pyplot, _save, _save_figure
from make_demo_data import make_coco
from train import build_config

CHOICES = ('FP32',) + LEVELS
NO_GENERIC = '-nogeneric'  # suffix of a detection level: without generic mode
DETECTION_CHOICES = CHOICES + tuple(level + NO_GENERIC for level in LEVELS[LEVELS.index('L3'):])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, 'configs', 'demo', 'faster_rcnn_r50_demo.py')
DETECTION_LOSSES = ('loss', 'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox')

Split = Tuple[torch.Tensor, torch.Tensor]


def digits(image_size: int) -> Tuple[Split, Split]:
    """The digits as (images, labels) train and test splits: a fixed stratified 75/25 split,
    images upsampled (bilinear) to ``image_size`` and normalised with the train mean and std.

    Args:
        image_size: side of the (N, 1, image_size, image_size) float32 images.

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train, test = train_test_split(np.arange(len(data.target)), test_size=0.25,
                                   stratify=data.target, random_state=0)
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    images = nn.functional.interpolate(images, size=image_size, mode='bilinear',
                                       align_corners=False)
    images = (images - images[train].mean()) / images[train].std()
    labels = torch.tensor(data.target)
    return (images[train], labels[train]), (images[test], labels[test])


class _Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def digits_cnn(width: int = 32) -> nn.Module:
    """A small ResNet-style CNN for 1-channel 16x16 digits: a conv-BN-ReLU stem, three basic
    blocks (the second halves the resolution, doubles the width), pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        _Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 for 1-channel images and 10 classes."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


MODELS = {'digits_cnn': digits_cnn, 'resnet18': resnet18}


@contextlib.contextmanager
def _config_restored() -> Iterator[None]:
    """Restores the global :data:`actnn_mm.config` on exit, whatever the body set."""
    saved = dataclasses.asdict(actnn_mm.config)
    try:
        yield
    finally:
        actnn_mm.config.level = saved.pop('level')
        for name, value in saved.items():
            setattr(actnn_mm.config, name, value)


@contextlib.contextmanager
def converted(model: nn.Module, level: str) -> Iterator[nn.Module]:
    """A copy of ``model`` converted at ``level`` ('FP32': left as it is).

    The level is set through :func:`actnn_mm.set_optimization_level` and the copy converted by
    :func:`actnn_mm.QModule`, as a user does; the global config is restored on exit.
    """
    with _config_restored():
        model = copy.deepcopy(model)
        if level != 'FP32':
            actnn_mm.set_optimization_level(level)
            actnn_mm.QModule(model)
        yield model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


# ----------------------------------------------------------------------------------- gradient


def _layer_of(parameter: str) -> str:
    return parameter.rsplit('.', 1)[0]


class _Moments:
    """Running mean and total variance (trace of the covariance) of gradient draws, per layer."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: Dict[str, torch.Tensor] = {}
        self.squares: Dict[str, float] = {}

    def add(self, grads: Dict[str, torch.Tensor]) -> None:
        """Add one draw: float64 gradients by parameter name."""
        self.n += 1
        for name, g in grads.items():
            self.sums[name] = self.sums[name] + g if name in self.sums else g.clone()
            layer = _layer_of(name)
            self.squares[layer] = self.squares.get(layer, 0.0) + float(g.square().sum())

    def mean(self) -> Dict[str, torch.Tensor]:
        """Mean of the draws by parameter name."""
        return {name: s / self.n for name, s in self.sums.items()}

    def variance(self) -> Dict[str, float]:
        """Unbiased total variance of the draws by layer (0 when below float64 resolution: the
        layer's gradient does not depend on anything compressed)."""
        norms = _squared_norms(self.mean())
        variance = {layer: (sq - self.n * norms[layer]) / (self.n - 1)
                    for layer, sq in self.squares.items()}
        return {layer: v if v > 1e-12 * self.squares[layer] / self.n else 0.0
                for layer, v in variance.items()}


def _squared_norms(grads: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Squared norm by layer of gradients given by parameter name."""
    norms: Dict[str, float] = {}
    for name, g in grads.items():
        norms[_layer_of(name)] = norms.get(_layer_of(name), 0.0) + float(g.square().sum())
    return norms


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """float64 gradient of the mean cross-entropy of (x, y), by parameter name."""
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def _warm_up(model: nn.Module, train: Split, steps: int, batch: int, seed: int) -> None:
    """Train ``model`` in full precision for ``steps`` SGD steps, so the gradients studied are
    those of a model in training rather than at initialisation."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(train[1]), generator=generator)[:batch]
        optimizer.zero_grad()
        _loss(model, train[0][idx], train[1][idx]).backward()
        optimizer.step()


def _draws(model: nn.Module, level: str, x: torch.Tensor, y: torch.Tensor, draws: int,
           seed: int) -> _Moments:
    """Moments of ``draws`` gradients of (x, y) by ``model`` converted at ``level``, each with
    its own rounding noise (seeded by ``seed``)."""
    moments = _Moments()
    with converted(model, level) as qmodel:
        torch.manual_seed(seed)
        _gradient(qmodel, x, y)  # not counted: adaptive levels learn gradient sizes from it
        for _ in tqdm(range(draws), desc=level, unit='draw', leave=False):
            moments.add(_gradient(qmodel, x, y))
    return moments


def gradient(args: argparse.Namespace) -> Dict:
    """Bias and variance of the gradient of one batch under each level, and the SGD variance."""
    torch.manual_seed(args.seed)
    train, _ = digits(args.image_size)
    model = MODELS[args.model]()
    model.train()
    _warm_up(model, train, args.warmup_steps, args.batch, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    sgd = _Moments()
    for _ in tqdm(range(args.minibatches), desc='SGD variance', unit='batch', leave=False):
        idx = torch.randperm(len(train[1]), generator=generator)[:args.batch]
        sgd.add(_gradient(model, train[0][idx], train[1][idx]))
    x, y = train[0][:args.batch], train[1][:args.batch]  # the fixed batch
    exact = _gradient(model, x, y)
    exact_norms, sgd_var = _squared_norms(exact), sgd.variance()
    rows = []
    for level in args.levels:
        draws = _draws(model, level, x, y, args.draws, args.seed)
        mean, var = draws.mean(), draws.variance()
        bias = _squared_norms({name: mean[name] - exact[name] for name in exact})
        layers = {layer: {'norm2': exact_norms[layer], 'bias2': bias[layer],
                          'quant_var': var[layer], 'sgd_var': sgd_var[layer]}
                  for layer in exact_norms}
        total = {key: sum(stats[key] for stats in layers.values())
                 for key in ('norm2', 'bias2', 'quant_var', 'sgd_var')}
        rows.append({'level': level, 'total': _relative(total, args.draws),
                     'layers': {layer: _relative(stats, args.draws)
                                for layer, stats in layers.items()}})
    _print_gradient_table(rows, args)
    result = {'model': args.model, 'batch': args.batch, 'image_size': args.image_size,
              'draws': args.draws, 'minibatches': args.minibatches,
              'warmup_steps': args.warmup_steps, 'seed': args.seed, 'rows': rows}
    print('saved', _save(f'fidelity_{args.model}', result), _plot_gradient(result))
    return result


def _relative(stats: Dict[str, float], draws: int) -> Dict[str, float]:
    """``stats`` (squared norms: exact gradient, bias of the mean of ``draws`` draws, variances)
    with the relative figures: bias and its noise floor (the bias an unbiased estimator shows
    from ``draws`` draws) relative to the gradient's norm, variances relative to its square,
    and the ratio of quantization to SGD variance."""
    norm2 = max(stats['norm2'], 1e-300)
    return {**stats, 'bias': (stats['bias2'] / norm2) ** 0.5,
            'bias_floor': (stats['quant_var'] / draws / norm2) ** 0.5,
            'quant_var_rel': stats['quant_var'] / norm2, 'sgd_var_rel': stats['sgd_var'] / norm2,
            'ratio': stats['quant_var'] / max(stats['sgd_var'], 1e-300)}


def _print_gradient_table(rows: List[Dict], args: argparse.Namespace) -> None:
    print(f'{args.model} on digits {args.image_size}x{args.image_size}, batch {args.batch}, '
          f'after {args.warmup_steps} FP32 steps; {args.draws} draws per level, SGD variance '
          f'over {args.minibatches} minibatches')
    print(f"{'level':>5} | {'bias':>8} | {'bias floor':>10} | {'quant var':>9} | "
          f"{'SGD var':>9} | {'quant/SGD':>9} | {'worst layer (quant/SGD)':>30}")
    for row in rows:
        t = row['total']
        layer, worst = max(row['layers'].items(), key=lambda item: item[1]['ratio'])
        worst_text = f"{layer} ({worst['ratio']:.2e})"
        print(f"{row['level']:>5} | {t['bias']:>8.2e} | {t['bias_floor']:>10.2e} | "
              f"{t['quant_var_rel']:>9.2e} | {t['sgd_var_rel']:>9.2e} | {t['ratio']:>9.2e} | "
              f"{worst_text:>30}")
    print('bias: |mean of draws - FP32| / |FP32|; bias floor: what an unbiased gradient shows '
          'from that many draws; variances relative to |FP32|^2')


def _plot_gradient(result: Dict) -> str:
    """Per layer (in model order), quantization variance over SGD variance for each level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for row in result['rows']:
        layers = list(row['layers'])
        ax.plot(range(len(layers)), [row['layers'][layer]['ratio'] for layer in layers],
                marker='.', label=f"{row['level']} (total {row['total']['ratio']:.1e})")
    ax.set_yscale('log', nonpositive='mask')  # exact layers (variance 0) are left out
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    ax.set_ylabel('quantization variance / SGD variance')
    ax.set_title(f"{result['model']} on digits, batch {result['batch']}: gradient variance "
                 f"from compression vs from minibatch sampling")
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    return _save_figure(fig, f"fidelity_{result['model']}")


# -------------------------------------------------------------------------------- convergence


def train(level: str, seed: int, data: Tuple[Split, Split], epochs: int, batch: int,
          lr: float) -> Dict[str, List[float]]:
    """Train :func:`digits_cnn` at ``level`` from seed ``seed``; the test accuracy after each epoch.

    The seed fixes the initial weights and the order of the batches, so runs of different levels
    with one seed differ only by the compression; rounding noise also follows the seed.

    Args:
        level: 'FP32' or an optimization level.
        seed: seed of the weights, batch order and rounding.
        data: train and test splits from :func:`digits`.
        epochs: passes over the train split (its last incomplete batch dropped).
        batch: batch size.
        lr: peak learning rate of SGD (momentum 0.9, weight decay 5e-4, cosine schedule).

    Returns:
        ``train_loss`` (mean per epoch) and ``test_accuracy`` (percent, after each epoch).
    """
    (x, y), (test_x, test_y) = data
    torch.manual_seed(seed)
    steps = epochs * (len(y) // batch)
    curves: Dict[str, List[float]] = {'train_loss': [], 'test_accuracy': []}
    with converted(digits_cnn(), level) as model:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(y), generator=generator)
            losses = []
            for i in range(len(y) // batch):
                idx = order[i * batch:(i + 1) * batch]
                optimizer.zero_grad()
                loss = _loss(model, x[idx], y[idx])
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                correct = (model(test_x).argmax(1) == test_y).sum().item()
            curves['train_loss'].append(statistics.fmean(losses))
            curves['test_accuracy'].append(100 * correct / len(test_y))
    return curves


def convergence(args: argparse.Namespace) -> Dict:
    """Test accuracy (mean and spread over seeds) and loss curves of each level on the digits."""
    data = digits(args.image_size)
    runs = [(level, seed) for seed in args.seeds for level in args.levels]
    rows: Dict[str, Dict] = {level: {'level': level, 'runs': []} for level in args.levels}
    for level, seed in tqdm(runs, desc='convergence', unit='run'):
        rows[level]['runs'].append(
            {'seed': seed, **train(level, seed, data, args.epochs, args.batch, args.lr)})
    for row in rows.values():
        final = [run['test_accuracy'][-1] for run in row['runs']]
        row.update(accuracy=final, mean=statistics.fmean(final),
                   std=statistics.stdev(final) if len(final) > 1 else 0.0)
    base = rows[args.levels[0]]
    print(f"digits_cnn on digits {args.image_size}x{args.image_size} ({len(data[0][1])} train, "
          f"{len(data[1][1])} test), {args.epochs} epochs, batch {args.batch}, seeds {args.seeds}")
    print(f"{'level':>5} | {'test accuracy %':>16} | {'vs ' + base['level']:>8} | per seed")
    for row in rows.values():
        print(f"{row['level']:>5} | {row['mean']:>7.2f} +- {row['std']:<5.2f} | "
              f"{row['mean'] - base['mean']:>+8.2f} | "
              f"{', '.join(f'{a:.2f}' for a in row['accuracy'])}")
    result = {'model': 'digits_cnn', 'image_size': args.image_size, 'epochs': args.epochs,
              'batch': args.batch, 'lr': args.lr, 'seeds': args.seeds,
              'rows': list(rows.values())}
    print('saved', _save('convergence', result), _plot_convergence(result))
    return result


def _plot_convergence(result: Dict) -> str:
    """Train loss and test accuracy per epoch: the mean over seeds, the range shaded."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in result['rows']:
        for ax, key in zip(axes, ('train_loss', 'test_accuracy')):
            curves = np.array([run[key] for run in row['runs']])
            epochs = np.arange(1, curves.shape[1] + 1)
            line, = ax.plot(epochs, curves.mean(0), label=f"{row['level']}: "
                            f"{row['mean']:.2f} ± {row['std']:.2f} %")
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(),
                            alpha=0.2)
    axes[0].set_yscale('log')
    axes[0].set_ylabel('train loss')
    axes[1].set_ylabel('test accuracy (%)')
    axes[1].set_ylim(max(0.0, min(axes[1].get_ylim()[0], 90.0)), 100)
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(True, alpha=0.3)
    axes[1].legend(loc='lower right')
    fig.suptitle(f"digits_cnn on scikit-learn digits, {len(result['seeds'])} seeds")
    return _save_figure(fig, 'convergence')


# ---------------------------------------------------------------------------------- detection


class _LossRecorder(Hook):
    """Keeps every training iteration's losses and the images of its batch, as (img_id, flipped).

    Args:
        description: label of the progress bar.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.losses: Dict[str, List[float]] = {key: [] for key in DETECTION_LOSSES}
        self.batches: List[List[Tuple[int, bool]]] = []
        self._progress: Optional[tqdm] = None

    def before_train(self, runner: Runner) -> None:
        self._progress = tqdm(total=runner.max_iters, desc=self.description, unit='iter',
                              leave=False)

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Optional[Dict] = None,
                         outputs: Optional[Dict] = None) -> None:
        for key in DETECTION_LOSSES:
            self.losses[key].append(float(outputs[key].detach()))
        self.batches.append([(s.img_id, bool(s.flip)) for s in data_batch['data_samples']])
        self._progress.update()

    def after_train(self, runner: Runner) -> None:
        self._progress.close()


def train_detector(level: str, seed: int, data_root: str, work_dir: str,
                   args: argparse.Namespace) -> Dict:
    """Train the demo Faster R-CNN config (``configs/demo``) at ``level``, as ``tools/train.py``
    would; the losses of every iteration.

    FP32 is the same config without the ``actnn`` key and with the ActNN layers its
    ``conv_cfg``/``norm_cfg`` name reverted to torch's (:func:`actnn_mm.revert`): the upstream
    model, nothing compressed. The seed fixes the initial weights, the batch order and the flips,
    so the levels see the same images in the same order; the rounding noise follows it too (and
    so shifts the draws of mmdet's RoI samplers, which share torch's generator). Validation and
    checkpoints are left out.

    Args:
        level: 'FP32', an optimization level, or one with the ``-nogeneric`` suffix.
        seed: the Runner's random seed.
        data_root: COCO-format data from ``tools/make_demo_data.py``.
        work_dir: the run's log folder.
        args: ``iters``, ``batch``, ``lr``, ``image_size`` of the study.

    Returns:
        ``seed``, ``losses`` (per loss name, one value per iteration), ``batches`` (per
        iteration, the (img_id, flipped) of each image) and ``avg_bits`` (of the last step; None
        for FP32).
    """
    actnn = None
    if level != 'FP32':
        actnn = dict(level=level.removesuffix(NO_GENERIC))
        if level.endswith(NO_GENERIC):
            actnn['generic'] = False
    options = {
        'actnn': actnn,
        'randomness': dict(seed=seed),
        'train_dataloader.batch_size': args.batch,
        'train_dataloader.dataset.data_root': data_root,
        'train_cfg.max_iters': args.iters,
        'optim_wrapper.optimizer.lr': args.lr,
        'val_dataloader': None, 'val_cfg': None, 'val_evaluator': None,
        'default_hooks.checkpoint': None,
        'log_level': 'WARNING',
    }
    cfg = build_config(argparse.Namespace(
        config=DEMO_CONFIG, cfg_options=options, launcher='none', work_dir=work_dir, amp=False,
        auto_scale_lr=False, resume=None))
    for transform in cfg.train_dataloader.dataset.pipeline:
        if transform.type == 'Resize':
            transform.scale = (args.image_size, args.image_size)
    with _config_restored():
        runner = Runner.from_cfg(cfg)
        if actnn is None:
            actnn_mm.revert(runner.model)
        recorder = _LossRecorder(f'{level} seed {seed}')
        runner.register_hook(recorder, priority='LOWEST')
        runner.train()
    bits = runner.message_hub.log_scalars.get('train/actnn/avg_bits')
    return {'seed': seed, 'losses': recorder.losses, 'batches': recorder.batches,
            'avg_bits': None if bits is None else bits.current()}


def _smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of ``values`` (over fewer values at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def detection(args: argparse.Namespace) -> Dict:
    """Loss curves of the demo Faster R-CNN config per level, trained from the same seeds."""
    work = os.path.join(benchmark.OUT_DIR, 'detection')
    data_root = os.path.join(work, 'coco')
    make_coco(data_root, args.images, 1, args.image_size, seed=0)
    runs = [(level, seed) for seed in args.seeds for level in args.levels]
    rows: Dict[str, Dict] = {level: {'level': level, 'runs': []} for level in args.levels}
    for level, seed in tqdm(runs, desc='detection', unit='run'):
        run = train_detector(level, seed, data_root, os.path.join(work, f'{level}_seed{seed}'),
                             args)
        for key, values in run['losses'].items():
            run[f'start_{key}'] = float(np.mean(values[:args.window]))
            run[f'end_{key}'] = float(np.mean(values[-args.window:]))
        rows[level]['runs'].append(run)
    base = rows[args.levels[0]]
    for row in rows.values():  # the runs of each level are in seed order
        row['gap'] = [run['end_loss'] - ref['end_loss']
                      for run, ref in zip(row['runs'], base['runs'])]
        row['relative_gap'] = [run['end_loss'] / ref['end_loss'] - 1
                               for run, ref in zip(row['runs'], base['runs'])]
    result = {'config': os.path.relpath(DEMO_CONFIG, REPO), 'images': args.images,
              'image_size': args.image_size, 'batch': args.batch, 'iters': args.iters,
              'lr': args.lr, 'window': args.window, 'seeds': args.seeds,
              'rows': list(rows.values())}
    _print_detection_table(result)
    print('saved', _save('detection', result), _plot_detection(result))
    return result


def _print_detection_table(result: Dict) -> None:
    print(f"Faster R-CNN R50-FPN ({result['config']}) from scratch on {result['images']} demo "
          f"images at {result['image_size']} px, batch {result['batch']}, lr {result['lr']}, "
          f"{result['iters']} iterations; losses averaged over {result['window']} iterations")
    ref = result['rows'][0]['level']
    print(f"{'level':>12} | {'seed':>4} | {'loss start':>10} | {'loss end':>8} | "
          + ' | '.join(f'{key:>13}' for key in DETECTION_LOSSES[1:])
          + f" | {'avg bits':>8} | {'end vs ' + ref:>16}")
    for row in result['rows']:
        for run, gap, relative in zip(row['runs'], row['gap'], row['relative_gap']):
            bits = '-' if run['avg_bits'] is None else f"{run['avg_bits']:.2f}"
            print(f"{row['level']:>12} | {run['seed']:>4} | {run['start_loss']:>10.3f} | "
                  f"{run['end_loss']:>8.3f} | "
                  + ' | '.join(f"{run['end_' + key]:>13.3f}" for key in DETECTION_LOSSES[1:])
                  + f" | {bits:>8} | {gap:>+7.3f} ({relative:>+6.1%})")


def _plot_detection(result: Dict) -> str:
    """Each loss per iteration and level: the smoothed mean over seeds, the raw values faint."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(DETECTION_LOSSES), figsize=(4 * len(DETECTION_LOSSES), 3.8),
                             constrained_layout=True)
    for row in result['rows']:
        end = statistics.fmean(run['end_loss'] for run in row['runs'])
        for ax, key in zip(axes, DETECTION_LOSSES):
            raw = np.mean([run['losses'][key] for run in row['runs']], axis=0)
            iters = np.arange(1, len(raw) + 1)
            line, = ax.plot(iters, _smoothed(raw, result['window']),
                            label=f"{row['level']}: final loss {end:.3f}")
            ax.plot(iters, raw, color=line.get_color(), alpha=0.25, linewidth=0.8)
    for ax, key in zip(axes, DETECTION_LOSSES):
        ax.set_title(key)
        ax.set_xlabel('iteration')
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Faster R-CNN R50-FPN on {result['images']} demo images "
                 f"({result['image_size']} px), seeds {result['seeds']}: smoothed over "
                 f"{result['window']} iterations (faint: per iteration)")
    return _save_figure(fig, 'detection')


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the study named on the command line (``argv``: None reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = parser.add_subparsers(dest='study', required=True)
    p = studies.add_parser('gradient', help='gradient bias and variance per level vs SGD variance')
    p.add_argument('--model', choices=sorted(MODELS), default='resnet18')
    p.add_argument('--levels', nargs='+', choices=CHOICES, default=['L1', 'L2', 'L3'])
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--draws', type=int, default=16, help='compressed gradients per level')
    p.add_argument('--minibatches', type=int, default=16, help='for the SGD variance')
    p.add_argument('--warmup-steps', type=int, default=20,
                   help='FP32 training steps first (about one epoch at batch 64)')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(run=gradient)
    p = studies.add_parser('convergence', help='test accuracy per level over seeds')
    p.add_argument('--levels', nargs='+', choices=CHOICES, default=['FP32', 'L2', 'L3'],
                   help='the first is the reference')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--image-size', type=int, default=16)
    p.set_defaults(run=convergence)
    p = studies.add_parser('detection', help='loss curves of the demo Faster R-CNN per level')
    p.add_argument('--levels', nargs='+', choices=DETECTION_CHOICES, default=['FP32', 'L3'],
                   help='the first is the reference')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--iters', type=int, default=60)
    p.add_argument('--images', type=int, default=4, help='demo training images')
    p.add_argument('--image-size', type=int, default=128)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--lr', type=float, default=0.02,
                   help="8x the preset's lr scaled to batch 2: overfits the images quickly")
    p.add_argument('--window', type=int, default=10,
                   help='iterations averaged for the smoothed curves and start/end losses')
    p.set_defaults(run=detection)
    for p in studies.choices.values():
        p.add_argument('--threads', type=int, default=1,
                       help='intra-op threads (the tensors are small: more threads mostly wait)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args.run(args)


if __name__ == '__main__':
    main()
