"""Model conversion: swap a model's torch layers for ActNN layers in place, and back.

The swap changes only each module's class (``module.__class__ = QConv2d``): parameters, buffers,
hooks and ``state_dict`` keys stay the same objects, so conversion works at any time (after
``.to(device)``, after the optimizer is built, inside a DDP wrapper) and checkpoints of converted
and plain models load into each other.
"""
import collections
import dataclasses
import functools
import logging
from typing import Dict, List, Optional, Tuple, Type

from torch import nn

from .config import config
from .generic import report_first_step
from .inplace import mark_inplace_norms
from .layers import (LAYERS, QConv2d, QConv3d, QConvTranspose2d, QConvTranspose3d, QLayer,
                     QLinear, QMaxPool2d, QSyncBatchNorm)
from .layers.norm import INPLACE_INPUT
from .layers.state import forget_state, model_state

logger = logging.getLogger('actnn_mm')

_TARGETS: Dict[Type[nn.Module], Type[QLayer]] = {layer._actnn_base: layer for layer in LAYERS}
_SUPPORTED = tuple(_TARGETS)


@functools.lru_cache(maxsize=None)
def _equivalents() -> Dict[Type[nn.Module], Type[QLayer]]:
    """Classes computing exactly what an ActNN layer's base computes, converted like it:
    mmengine's ``SyncBatchNorm``, the layer of mmcv's ``dict(type='SyncBN')`` (torch's, with an
    input check of its own for parrots only), and its ``_BatchNormXd``, which the Runner puts in
    place of every ``SyncBatchNorm`` when training in one process (QSyncBatchNorm then runs as a
    batch norm of any rank); mmcv's wrappers of Conv2d/3d, ConvTranspose2d/3d, Linear and
    MaxPool2d, whose forward only differs for empty inputs on torch < 1.5 (every mmcv FFN,
    SegFormer's convs); and torch's ``NonDynamicallyQuantizableLinear`` (a marker subclass
    without a forward of its own)."""
    equivalents: Dict[Type[nn.Module], Type[QLayer]] = {
        nn.modules.linear.NonDynamicallyQuantizableLinear: QLinear}
    try:
        from mmengine.model.utils import _BatchNormXd
        from mmengine.utils.dl_utils.parrots_wrapper import SyncBatchNorm
        equivalents.update({SyncBatchNorm: QSyncBatchNorm, _BatchNormXd: QSyncBatchNorm})
        from mmcv.cnn.bricks import wrappers
    except ImportError:
        return equivalents
    equivalents.update({wrappers.Conv2d: QConv2d, wrappers.Conv3d: QConv3d,
                        wrappers.ConvTranspose2d: QConvTranspose2d,
                        wrappers.ConvTranspose3d: QConvTranspose3d, wrappers.Linear: QLinear,
                        wrappers.MaxPool2d: QMaxPool2d})
    return equivalents


@dataclasses.dataclass
class ConversionSummary:
    """What :func:`convert` did.

    Attributes:
        level: the optimization level at conversion.
        converted: number of layers converted, by torch class name.
        already: number of layers that were ActNN layers already, by class name.
        skipped: (module name, class name, reason) of each layer left as it was.
    """

    level: str
    converted: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    already: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        def counts(counter: collections.Counter[str]) -> str:
            return ', '.join(f'{n} {name}' for name, n in counter.most_common()) or 'none'

        lines = [f'actnn_mm ({self.level}): converted {counts(self.converted)}']
        if self.already:
            lines.append(f'  already converted: {counts(self.already)}')
        groups: Dict[Tuple[str, str], List[str]] = collections.defaultdict(list)
        for name, cls, reason in self.skipped:
            groups[(cls, reason)].append(name or '<root>')
        for (cls, reason), names in groups.items():
            shown = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
            lines.append(f'  skipped {len(names)} {cls} ({shown}): {reason}')
        return '\n'.join(lines)


def _unsupported(module: nn.Module) -> Optional[str]:
    """Why a layer of a supported class cannot be converted, or None."""
    if isinstance(module, nn.MaxPool2d) and module.return_indices:
        return 'return_indices=True is not supported (the indices are an output)'
    return None


def _not_candidate(module: nn.Module) -> Optional[str]:
    """Why a layer of an unsupported class is worth reporting, or None if it is not."""
    if isinstance(module, _SUPPORTED):
        base = next(cls for cls in _SUPPORTED if isinstance(module, cls))
        return (f'subclass of {base.__name__}: converting would replace its own forward; its '
                f'activations stay in full precision')
    if next(module.parameters(recurse=False), None) is not None:
        return 'no ActNN layer for this type: its activations stay in full precision'
    return None


def convert(model: nn.Module) -> Tuple[nn.Module, ConversionSummary]:
    """Convert the supported layers of ``model`` in place, following ``config``.

    Exact instances of the supported torch classes are converted (subclasses are skipped: they
    may have their own forward), and those of equivalent classes, e.g. mmengine's
    ``SyncBatchNorm`` (mmcv's 'SyncBN') and ``_BatchNormXd`` (a reverted one) to QSyncBatchNorm;
    ``config.compressed_layers`` ('none' at L0, 'conv' at L1) limits which families are.
    BatchNorm layers that only a convolution feeds are marked to normalize in place
    (:mod:`actnn_mm.inplace`). Converting twice is a no-op.

    Args:
        model: any module, e.g. a DDP wrapper (its wrapped module is converted).

    Returns:
        ``model`` and the summary of what was converted and skipped, with reasons.
    """
    summary = ConversionSummary(config.level)
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, QLayer):
            summary.already[cls.__name__] += 1
            continue
        target = _TARGETS.get(cls) or _equivalents().get(cls)
        if target is None:
            reason = _not_candidate(module)
        elif not config.compresses(target._actnn_family):
            reason = (f'level {config.level} (compressed_layers={config.compressed_layers!r}) '
                      f'does not compress {target._actnn_family} layers')
        else:
            reason = _unsupported(module)
        if reason is not None:
            summary.skipped.append((name, cls.__name__, reason))
        elif target is not None:
            if cls is not target._actnn_base:  # an equivalent class, restored by revert
                module.__dict__['_actnn_original_class'] = cls
                if target is QSyncBatchNorm:
                    module.__dict__.setdefault('process_group', None)
            module.__class__ = target
            summary.converted[cls.__name__] += 1
    model_state(model).attach(model.modules())  # the model's own allocator, log, cache
    mark_inplace_norms(model)
    return model, summary


def QModule(model: nn.Module) -> nn.Module:  # noqa: N802 (ActNN's name)
    """Convert ``model``'s layers to ActNN layers in place and log a summary (logger 'actnn_mm').

    Set the optimization level first (:func:`actnn_mm.set_optimization_level`): it decides which
    layers are converted. Unlike ActNN's, this works at any time and returns the same object.
    The first training forward pass afterwards also logs the modules that still make autograd
    keep 1 MiB or more of full-precision activations (:func:`actnn_mm.report_uncompressed`;
    not under generic mode, which compresses those). That forward is observed through
    saved-tensor hooks, which shadow other saved-tensor hooks (e.g.
    ``torch.autograd.graph.save_on_cpu``) for that one forward; :func:`convert` converts without
    the report.

    Args:
        model: the model (or a DDP wrapper of it).

    Returns:
        ``model`` itself, converted.
    """
    model, summary = convert(model)
    logger.info('%s', summary)
    report_first_step(model)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn the ActNN layers of ``model`` back into their torch classes (or the equivalent
    classes they were converted from), in place.

    Args:
        model: a model converted by :func:`QModule` (or holding ActNN layers built directly).

    Returns:
        ``model`` itself.
    """
    for module in model.modules():
        if type(module) in LAYERS:
            module.__class__ = module.__dict__.pop('_actnn_original_class',
                                                   type(module)._actnn_base)
            for key in ('actnn_saved_bytes', 'actnn_full_bytes', INPLACE_INPUT):
                module.__dict__.pop(key, None)
        forget_state(module)
    return model
