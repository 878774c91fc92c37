"""Fidelity of activation-compressed training on real data: scikit-learn's handwritten digits,
and the loss curves of the demo Faster R-CNN and of the FCN and Semantic FPN presets.

    python tools/fidelity.py gradient [--model resnet18 --image-size 64 --levels L1 L2 L3]
    python tools/fidelity.py convergence [--levels FP32 L2 L3 --seeds 0 1 2 --epochs 20]
    python tools/fidelity.py detection [--levels FP32 L3 --seeds 0 --iters 60]
    python tools/fidelity.py segmentation [--models fcn fpn --levels FP32 L3 L3@1.5 --seeds 0 1 2]

``gradient``: for one fixed batch, the bias and variance of the gradient under each level against
the full-precision gradient, next to the minibatch (SGD) variance of the full-precision gradient,
as in ActNN's analysis: the variance of a compressed step is the SGD variance plus the
quantization variance, so the latter must be small next to the former. Per layer as well.

``convergence``: a small ResNet-style CNN trained on the digits with each level and several
seeds; the test accuracy (mean, spread) and loss curves per level.

``detection``: the Faster R-CNN preset on generated COCO-format demo data
(``configs/demo/faster_rcnn_r50_demo.py`` through ``tools/train.py``'s config handling), trained
from the same seed at each level; its losses per iteration. ``L3-nogeneric`` is L3 without
generic mode (``actnn=dict(level='L3', generic=False)``), ``L3@1.5`` L3 at a budget of 1.5 bits
(``actnn=dict(level='L3', activation_compression_bits=[1.5])``).

``segmentation``: the same for the FCN R50-D8 and Semantic FPN R50 presets
(``configs/actnn/{fcn,fpn}_r50_1gpu.py``) on generated Cityscapes-format demo data; mmseg's
decode loss ``decode.loss_ce``, the total ``loss`` and the batch's pixel accuracy per iteration.

Each prints a table and saves JSON and a PNG plot under work_dirs/bench/. The digits (1797 8x8
images, 10 classes) ship with scikit-learn and the demo images are drawn, so nothing is
downloaded.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import statistics
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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
from benchmark import BUDGET, _pyplot, _save, _save_figure, check_level, set_level
from make_demo_data import make_cityscapes, make_coco
from train import build_config

NO_GENERIC = '-nogeneric'  # suffix of a detection or segmentation level: without generic mode
GENERIC_LEVELS = LEVELS[LEVELS.index('L3'):]  # where generic mode is on by default
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


def level_spec(text: str) -> str:
    """An argparse type: 'FP32', a level, or ``LEVEL@BITS`` (e.g. 'L3@1.5': L3 with an average
    budget of 1.5 bits, group statistics included; 'L2@2': uniform 2 bits on L2's layers)."""
    if text != 'FP32':
        try:
            check_level(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f'{text!r}: {e}; expected FP32, one of {LEVELS} or '
                                             f'LEVEL{BUDGET}BITS (e.g. L3{BUDGET}1.5)') from e
    return text


@contextlib.contextmanager
def converted(model: nn.Module, level: str) -> Iterator[nn.Module]:
    """A copy of ``model`` converted at ``level`` (see :func:`level_spec`; 'FP32': left as it
    is).

    The level is set through :func:`actnn_mm.set_optimization_level` (and the bits through
    ``actnn_mm.config``) and the copy converted by :func:`actnn_mm.QModule`, as a user does; the
    global config is restored on exit.
    """
    with _config_restored():
        model = copy.deepcopy(model)
        if level != 'FP32':
            set_level(level)
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
           seed: int, indices: Optional[List[int]]) -> _Moments:
    """Moments of ``draws`` gradients of (x, y) by ``model`` converted at ``level``, each with
    its own rounding noise (seeded by ``seed``); ``indices``: the samples' dataset indices, told
    to the adaptive allocator as :class:`actnn_mm.mm.ActNNHook` does (None: not told)."""
    moments = _Moments()
    with converted(model, level) as qmodel:
        torch.manual_seed(seed)
        actnn_mm.set_sample_indices(qmodel, indices)
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
        draws = _draws(model, level, x, y, args.draws, args.seed,
                       list(range(args.batch)) if args.sample_indices else None)
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
              'warmup_steps': args.warmup_steps, 'seed': args.seed,
              'sample_indices': args.sample_indices, 'rows': rows}
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
          f'over {args.minibatches} minibatches; sample indices '
          f'{"told" if args.sample_indices else "not told"} to the allocator')
    print(f"{'level':>8} | {'bias':>8} | {'bias floor':>10} | {'quant var':>9} | "
          f"{'SGD var':>9} | {'quant/SGD':>9} | {'worst layer (quant/SGD)':>30}")
    for row in rows:
        t = row['total']
        layer, worst = max(row['layers'].items(), key=lambda item: item[1]['ratio'])
        worst_text = f"{layer} ({worst['ratio']:.2e})"
        print(f"{row['level']:>8} | {t['bias']:>8.2e} | {t['bias_floor']:>10.2e} | "
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
        if level != 'FP32':  # the adaptive allocator knows samples by index, as with the hook
            set_indices = functools.partial(actnn_mm.set_sample_indices, model)
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
                if level != 'FP32':
                    set_indices(idx.tolist())
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
    print(f"{'level':>8} | {'test accuracy %':>16} | {'vs ' + base['level']:>8} | per seed")
    for row in rows.values():
        print(f"{row['level']:>8} | {row['mean']:>7.2f} +- {row['std']:<5.2f} | "
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


# ------------------------------------------------------------------- detection and segmentation


@dataclasses.dataclass(frozen=True)
class Preset:
    """A preset config trained by the detection or segmentation study.

    Args:
        name: its name on the command line and in the JSON.
        title: the model, for tables and plots.
        config: the config file.
        losses: the outputs of a training step kept per iteration; the first is the total loss.
        options: the study's ``--cfg-options`` for this config: ``(args, data_root) -> dict``.
    """
    name: str
    title: str
    config: str
    losses: Tuple[str, ...]
    options: Callable[[argparse.Namespace, str], Dict] = lambda args, data_root: {}


def _segmentation_options(args: argparse.Namespace, data_root: str) -> Dict:
    """Offline (no pretrained backbone); whole demo images, ``image_size`` wide and half as
    high (the Cityscapes aspect), flipped at random but not resized, cropped or distorted, and
    padded to that size (not to the preset's 512x1024 crop); the preset's poly schedule squeezed
    into the study's iterations."""
    pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                dict(type='Resize', scale=(args.image_size, args.image_size), keep_ratio=True),
                dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]
    return {'model.pretrained': None,
            'model.data_preprocessor.size': (args.image_size // 2, args.image_size),
            'train_dataloader.dataset.pipeline': pipeline,
            'param_scheduler': [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0,
                                     end=args.iters, by_epoch=False)]}


FASTER_RCNN = Preset('faster_rcnn', 'Faster R-CNN R50-FPN', DEMO_CONFIG, DETECTION_LOSSES)
SEGMENTATION_LOSSES = ('loss', 'decode.loss_ce', 'decode.acc_seg')
SEGMENTATION_PRESETS = {
    'fcn': Preset('fcn', 'FCN R50-D8', os.path.join(REPO, 'configs', 'actnn', 'fcn_r50_1gpu.py'),
                  SEGMENTATION_LOSSES + ('aux.loss_ce',), _segmentation_options),
    'fpn': Preset('fpn', 'Semantic FPN R50',
                  os.path.join(REPO, 'configs', 'actnn', 'fpn_r50_1gpu.py'), SEGMENTATION_LOSSES,
                  _segmentation_options),
}


def preset_level(text: str) -> str:
    """An argparse type: what :func:`level_spec` accepts, or an L3-L5 level (with or without
    ``@BITS``) with the ``-nogeneric`` suffix (e.g. 'L3@1.5-nogeneric')."""
    spec = text.removesuffix(NO_GENERIC)
    if spec != text and spec.partition(BUDGET)[0] not in GENERIC_LEVELS:
        raise argparse.ArgumentTypeError(f'{text!r}: {NO_GENERIC} goes with one of '
                                         f'{GENERIC_LEVELS}')
    level_spec(spec)
    return text


def actnn_key(level: str) -> Optional[Dict]:
    """The config's ``actnn`` key for ``level`` (see :func:`preset_level`; None for FP32): e.g.
    'L3@1.5-nogeneric' is ``dict(level='L3', activation_compression_bits=[1.5],
    generic=False)``."""
    if level == 'FP32':
        return None
    spec = level.removesuffix(NO_GENERIC)
    name, _, bits = spec.partition(BUDGET)
    key: Dict = dict(level=name)
    if bits:
        key['activation_compression_bits'] = [float(bits)]
    if spec != level:
        key['generic'] = False
    return key


def _sample_key(sample: Any) -> Tuple[Any, bool]:
    """A training sample as (its COCO img_id, else its image file's name; flipped)."""
    meta = sample.metainfo
    image = meta['img_id'] if 'img_id' in meta else os.path.basename(meta['img_path'])
    return image, bool(meta.get('flip', False))


class _LossRecorder(Hook):
    """Keeps every training iteration's losses and the images of its batch, as (image, flipped)
    (see :func:`_sample_key`).

    Args:
        description: label of the progress bar.
        keys: the outputs to keep.
    """

    def __init__(self, description: str, keys: Sequence[str]) -> None:
        self.description = description
        self.losses: Dict[str, List[float]] = {key: [] for key in keys}
        self.batches: List[List[Tuple[Any, bool]]] = []
        self._progress: Optional[tqdm] = None

    def before_train(self, runner: Runner) -> None:
        self._progress = tqdm(total=runner.max_iters, desc=self.description, unit='iter',
                              leave=False)

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Optional[Dict] = None,
                         outputs: Optional[Dict] = None) -> None:
        for key, values in self.losses.items():
            values.append(float(outputs[key].detach()))
        self.batches.append([_sample_key(s) for s in data_batch['data_samples']])
        self._progress.update()

    def after_train(self, runner: Runner) -> None:
        self._progress.close()


def train_preset(preset: Preset, level: str, seed: int, data_root: str, work_dir: str,
                 args: argparse.Namespace) -> Dict:
    """Train ``preset`` at ``level``, as ``tools/train.py`` would; the losses of every iteration.

    The level goes through the config's ``actnn`` key (:func:`actnn_key`). FP32 is the same
    config without it and with the ActNN layers its ``conv_cfg``/``norm_cfg`` name reverted to
    torch's (:func:`actnn_mm.revert`): the upstream model, nothing compressed. The seed fixes the
    initial weights, the batch order and the flips, so the levels see the same images in the same
    order; the rounding noise follows it too (and so shifts the draws of mmdet's RoI samplers and
    of dropout, which share torch's generator). Every ``Resize`` of the training pipeline fits
    the images in ``image_size`` x ``image_size``. Validation and checkpoints are left out.

    Args:
        preset: the config and what to record.
        level: 'FP32', a level, ``LEVEL@BITS``, either with the ``-nogeneric`` suffix.
        seed: the Runner's random seed.
        data_root: the demo data from ``tools/make_demo_data.py``.
        work_dir: the run's log folder.
        args: ``iters``, ``batch``, ``lr``, ``image_size`` of the study.

    Returns:
        ``seed``, ``actnn`` (the config's key), ``losses`` (per recorded output, one value per
        iteration), ``batches`` (per iteration, the (image, flipped) of each sample),
        ``avg_bits`` (of the quantized activations in the last step, as the ActNNHook logs it)
        and ``statistics_bits`` (what their group statistics cost per value; at L3 the two add
        up to the budget); both None for FP32.
    """
    actnn = actnn_key(level)
    options = {
        'actnn': actnn,
        'randomness': dict(seed=seed),
        'train_dataloader.batch_size': args.batch,
        'train_dataloader.num_workers': 0, 'train_dataloader.persistent_workers': False,
        'train_dataloader.dataset.data_root': data_root,
        'train_cfg.max_iters': args.iters,
        'optim_wrapper.optimizer.lr': args.lr,
        'val_dataloader': None, 'val_cfg': None, 'val_evaluator': None,
        'default_hooks.checkpoint': None,
        'log_level': 'WARNING',
        **preset.options(args, data_root),
    }
    cfg = build_config(argparse.Namespace(
        config=preset.config, cfg_options=options, launcher='none', work_dir=work_dir, amp=False,
        auto_scale_lr=False, resume=None))
    for transform in cfg.train_dataloader.dataset.pipeline:
        if transform.type == 'Resize':
            transform.scale = (args.image_size, args.image_size)
    with _config_restored():
        runner = Runner.from_cfg(cfg)
        if actnn is None:
            actnn_mm.revert(runner.model)
        recorder = _LossRecorder(f'{preset.name} {level} seed {seed}', preset.losses)
        runner.register_hook(recorder, priority='LOWEST')
        runner.train()
    step = actnn_mm.stats(runner.model) if actnn is not None else {}
    return {'seed': seed, 'actnn': actnn, 'losses': recorder.losses, 'batches': recorder.batches,
            'avg_bits': step.get('average_bits'), 'statistics_bits': step.get('statistics_bits')}


def _smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of ``values`` (over fewer values at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_curves(preset: Preset, data_root: str, args: argparse.Namespace) -> Dict:
    """Train ``preset`` at each of ``args.levels`` from each of ``args.seeds``; its losses.

    Returns:
        ``model``, ``title``, ``config`` and ``rows``: per level, its ``runs`` (those of
        :func:`train_preset` in seed order, with ``start_KEY`` and ``end_KEY``: the mean of the
        first and last ``window`` values of each output), ``mean`` and ``std`` of those over the
        seeds, and ``gap`` and ``relative_gap``: the end loss per seed against the first level's.
    """
    work = os.path.join(benchmark.OUT_DIR, args.study, preset.name)
    runs = [(level, seed) for seed in args.seeds for level in args.levels]
    rows: Dict[str, Dict] = {level: {'level': level, 'runs': []} for level in args.levels}
    for level, seed in tqdm(runs, desc=f'{args.study} {preset.name}', unit='run'):
        run = train_preset(preset, level, seed, data_root,
                           os.path.join(work, f'{level}_seed{seed}'), args)
        for key, values in run['losses'].items():
            run[f'start_{key}'] = float(np.mean(values[:args.window]))
            run[f'end_{key}'] = float(np.mean(values[-args.window:]))
        rows[level]['runs'].append(run)
    base = rows[args.levels[0]]
    edges = [f'{edge}_{key}' for key in preset.losses for edge in ('start', 'end')]
    for row in rows.values():  # the runs of each level are in seed order
        row['mean'] = {name: statistics.fmean(run[name] for run in row['runs'])
                       for name in edges}
        row['std'] = {name: statistics.stdev(run[name] for run in row['runs'])
                      if len(row['runs']) > 1 else 0.0 for name in edges}
        row['gap'] = [run['end_loss'] - ref['end_loss']
                      for run, ref in zip(row['runs'], base['runs'])]
        row['relative_gap'] = [run['end_loss'] / ref['end_loss'] - 1
                               for run, ref in zip(row['runs'], base['runs'])]
    return {'model': preset.name, 'title': preset.title,
            'config': os.path.relpath(preset.config, REPO), 'rows': list(rows.values())}


def _settings(args: argparse.Namespace) -> Dict:
    return {'images': args.images, 'image_size': args.image_size, 'batch': args.batch,
            'iters': args.iters, 'lr': args.lr, 'window': args.window, 'seeds': args.seeds}


def detection(args: argparse.Namespace) -> Dict:
    """Loss curves of the demo Faster R-CNN config per level, trained from the same seeds."""
    data_root = os.path.join(benchmark.OUT_DIR, 'detection', 'coco')
    make_coco(data_root, args.images, 1, args.image_size, seed=0)
    result = {**_settings(args), **loss_curves(FASTER_RCNN, data_root, args)}
    _print_loss_table(result, result)
    plot = _plot_loss_curves(result, FASTER_RCNN.title,
                             [(result, (key,), key) for key in DETECTION_LOSSES], 'detection')
    print('saved', _save('detection', result), plot)
    return result


def segmentation(args: argparse.Namespace) -> Dict:
    """Loss curves of the FCN and Semantic FPN presets on demo Cityscapes data per level,
    trained from the same seeds."""
    data_root = os.path.join(benchmark.OUT_DIR, 'segmentation', 'cityscapes')
    make_cityscapes(data_root, args.images, 1, args.image_size // 2, seed=0)
    result = {**_settings(args), 'models': []}
    for name in args.models:
        result['models'].append(loss_curves(SEGMENTATION_PRESETS[name], data_root, args))
        _print_loss_table(result['models'][-1], result)
    panels = []
    for curves in result['models']:  # without an auxiliary head the decode loss is the loss
        alone = 'aux.loss_ce' not in SEGMENTATION_PRESETS[curves['model']].losses
        panels.append((curves, ('loss',) if alone else ('loss', 'decode.loss_ce'),
                       curves['title'] + (' (loss = decode.loss_ce)' if alone else '')))
    plot = _plot_loss_curves(result, ' and '.join(curves['title'] for curves in result['models']),
                             panels, 'segmentation')
    print('saved', _save('segmentation', result), plot)
    return result


def _print_loss_table(curves: Dict, settings: Dict) -> None:
    """Per level and seed, the start and end of the total loss, the end of the other outputs,
    the bits of the last step and the end loss against the first level's; with several seeds,
    per level their mean +- standard deviation."""
    print(f"{curves['title']} ({curves['config']}) from scratch on {settings['images']} demo "
          f"images at {settings['image_size']} px, batch {settings['batch']}, lr "
          f"{settings['lr']}, {settings['iters']} iterations; losses averaged over "
          f"{settings['window']} iterations")
    ref, others = curves['rows'][0]['level'], list(curves['rows'][0]['runs'][0]['losses'])[1:]
    print(f"{'level':>16} | {'seed':>4} | {'loss start':>16} | {'loss end':>16} | "
          + ' | '.join(f'{key:>16}' for key in others)
          + f" | {'bits+stats':>10} | {'end vs ' + ref:>16}")
    for row in curves['rows']:
        for run, gap, relative in zip(row['runs'], row['gap'], row['relative_gap']):
            bits = '-' if run['avg_bits'] is None else \
                f"{run['avg_bits']:.2f}+{run['statistics_bits']:.2f}"
            print(f"{row['level']:>16} | {run['seed']:>4} | "
                  + ' | '.join(f"{run[end]:>16.3f}"
                               for end in ['start_loss', 'end_loss']
                               + [f'end_{key}' for key in others])
                  + f" | {bits:>10} | {gap:>+7.3f} ({relative:>+6.1%})")
        if len(row['runs']) > 1:
            gap = statistics.fmean(row['gap'])
            relative = row['mean']['end_loss'] / curves['rows'][0]['mean']['end_loss'] - 1
            print(f"{row['level']:>16} | {'mean':>4} | "
                  + ' | '.join(f"{row['mean'][end]:>7.3f} +- {row['std'][end]:<5.3f}"
                               for end in ['start_loss', 'end_loss']
                               + [f'end_{key}' for key in others])
                  + f" | {'':>10} | {gap:>+7.3f} ({relative:>+6.1%})")
    print("after 'loss end': the end of each output; bits+stats: the last step's average bits "
          'of the quantized activations + their group statistics per value')


def _plot_loss_curves(result: Dict, title: str,
                      panels: Sequence[Tuple[Dict, Sequence[str], str]], name: str) -> str:
    """One panel per (curves, outputs, title) of ``panels``: each output per iteration and level
    on a log scale, the smoothed mean over seeds (the first output solid, the others dashed), the
    first output's raw mean faint; a level has one colour in every panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * max(len(panels), 2), 3.8),
                             constrained_layout=True, squeeze=False)
    for ax, (curves, keys, panel_title) in zip(axes[0], panels):
        for colour, row in enumerate(curves['rows']):
            for style, key in zip(('-', '--', ':'), keys):
                raw = np.mean([run['losses'][key] for run in row['runs']], axis=0)
                iters = np.arange(1, len(raw) + 1)
                label = row['level'] if len(keys) == 1 else f"{row['level']} {key}"
                ax.plot(iters, _smoothed(raw, result['window']), style, color=f'C{colour}',
                        label=f"{label}: end {row['mean'][f'end_{key}']:.3f}")
                if style == '-':
                    ax.plot(iters, raw, color=f'C{colour}', alpha=0.25, linewidth=0.8)
        ax.set_title(panel_title)
        ax.set_yscale('log')
        ax.set_xlabel('iteration')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} on {result['images']} demo images ({result['image_size']} px), seeds "
                 f"{result['seeds']}: mean over seeds smoothed over {result['window']} "
                 f"iterations (faint: per iteration)")
    return _save_figure(fig, name)


def _add_preset_arguments(p: argparse.ArgumentParser, levels: List[str], seeds: List[int],
                          iters: int, images: int, image_size: int, batch: int, lr: float,
                          lr_help: str, window: int) -> None:
    """The detection and segmentation studies' flags, with their defaults."""
    p.add_argument('--levels', nargs='+', type=preset_level, default=levels,
                   help=f'the first is the reference; FP32, a level, LEVEL{BUDGET}BITS (e.g. '
                        f'L3{BUDGET}1.5), either with {NO_GENERIC} (L3-L5: without generic mode)')
    p.add_argument('--seeds', type=int, nargs='+', default=seeds)
    p.add_argument('--iters', type=int, default=iters)
    p.add_argument('--images', type=int, default=images, help='demo training images')
    p.add_argument('--image-size', type=int, default=image_size,
                   help='the images fit in a square of this side')
    p.add_argument('--batch', type=int, default=batch)
    p.add_argument('--lr', type=float, default=lr, help=lr_help)
    p.add_argument('--window', type=int, default=window,
                   help='iterations averaged for the smoothed curves and start/end losses')


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the study named on the command line (``argv``: None reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = parser.add_subparsers(dest='study', required=True)
    p = studies.add_parser('gradient', help='gradient bias and variance per level vs SGD variance')
    p.add_argument('--model', choices=sorted(MODELS), default='resnet18')
    p.add_argument('--levels', nargs='+', type=level_spec, default=['L1', 'L2', 'L2@2', 'L3'],
                   help=f'FP32, a level, or LEVEL{BUDGET}BITS (e.g. L3{BUDGET}1.5, L2{BUDGET}2)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--image-size', type=int, default=64)
    p.add_argument('--draws', type=int, default=16, help='compressed gradients per level')
    p.add_argument('--minibatches', type=int, default=16, help='for the SGD variance')
    p.add_argument('--warmup-steps', type=int, default=20,
                   help='FP32 training steps first (about one epoch at batch 64)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-sample-indices', dest='sample_indices', action='store_false',
                   help="don't tell the allocator the samples' dataset indices (the OpenMMLab "
                        'hook tells them; plain PyTorch code tells them with '
                        'actnn_mm.set_sample_indices)')
    p.set_defaults(run=gradient)
    p = studies.add_parser('convergence', help='test accuracy per level over seeds')
    p.add_argument('--levels', nargs='+', type=level_spec,
                   default=['FP32', 'L2', 'L3', 'L3@1.5', 'L3@1.25'],
                   help=f'the first is the reference; FP32, a level or LEVEL{BUDGET}BITS')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--image-size', type=int, default=16)
    p.set_defaults(run=convergence)
    p = studies.add_parser('detection', help='loss curves of the demo Faster R-CNN per level')
    _add_preset_arguments(p, ['FP32', 'L3'], [0], iters=60, images=4, image_size=128, batch=2,
                          lr=0.02, window=10,
                          lr_help="8x the preset's lr scaled to batch 2: overfits the images "
                                  'quickly')
    p.set_defaults(run=detection)
    p = studies.add_parser('segmentation',
                           help='loss curves of the FCN and Semantic FPN presets per level')
    p.add_argument('--models', nargs='+', choices=sorted(SEGMENTATION_PRESETS),
                   default=['fcn', 'fpn'])
    _add_preset_arguments(p, ['FP32', 'L3', 'L3@1.5'], [0, 1, 2], iters=60, images=8,
                          image_size=128, batch=2, lr=0.01,
                          lr_help="the presets' lr (for batch 8)", window=10)
    p.set_defaults(run=segmentation)
    for p in studies.choices.values():
        p.add_argument('--threads', type=int, default=1,
                       help='intra-op threads (the tensors are small: more threads mostly wait)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args.run(args)


if __name__ == '__main__':
    main()
