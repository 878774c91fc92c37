"""Which BatchNorm layers may normalize their input in place: those whose input, a
convolution's output, nothing but the layer can see.

A training BatchNorm that keeps its input compressed needs no full-precision copy of it, so it
can write its output over the convolution's output and the forward pass holds one
activation-sized tensor fewer at its peak (the largest term of the peak at 2 bits). Overwriting
a tensor that anyone else sees would silently change what they see, so this happens only where
the forward code is known to pass the convolution's output to the BatchNorm alone:

* consecutive (convolution, BatchNorm) children of a plain ``nn.Sequential``;
* mmcv's ``ConvModule`` whose order puts 'norm' right after 'conv';
* the stems and residual blocks of the ResNet families of torchvision, mmpretrain, mmdet and
  mmseg (``conv1 -> norm1`` and so on), as long as the class keeps that library's forward.

:func:`mark_inplace_norms` marks such a BatchNorm with its convolution and the structure (a
BatchNorm that appears more than once in the model is not marked). In each training forward a
marked layer then overwrites its input only if (:func:`actnn_mm.layers.norm.overwrites_input`):

* the structure's own code called it (not, e.g., code that calls the children of an
  ``nn.Sequential`` one by one and keeps their outputs);
* its input was made by an ActNN convolution in this forward (so a layer reached some other
  way, e.g. a deformable convolution in a block, takes the copying path) and nobody called
  ``retain_grad`` on it;
* neither the convolution nor the BatchNorm has forward hooks or forward pre-hooks (feature taps,
  distillation), and no global module forward hooks are registered
  (``torch.nn.modules.module.register_module_forward_hook`` and the pre-hook variant).
"""
import collections
import functools
import importlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type

from torch import nn

from .layers.conv import _QConvMixin
from .layers.norm import INPLACE_INPUT, _QBatchNormMixin

Pairs = Tuple[Tuple[str, str], ...]
_STEM: Pairs = (('conv1', 'norm1'),)
_BASIC: Pairs = (('conv1', 'norm1'), ('conv2', 'norm2'))
_BOTTLENECK: Pairs = _BASIC + (('conv3', 'norm3'),)


def _torchvision_names(pairs: Pairs) -> Pairs:
    return tuple((conv, norm.replace('norm', 'bn')) for conv, norm in pairs)


# module path -> {class name: (conv, norm) attribute pairs its forward chains directly}
_BLOCKS: Dict[str, Dict[str, Pairs]] = {
    'torchvision.models.resnet': {'ResNet': _torchvision_names(_STEM),
                                  'BasicBlock': _torchvision_names(_BASIC),
                                  'Bottleneck': _torchvision_names(_BOTTLENECK)},
    **{path: {'ResNet': _STEM, 'BasicBlock': _BASIC, 'Bottleneck': _BOTTLENECK}
       for path in ('mmpretrain.models.backbones.resnet', 'mmdet.models.backbones.resnet',
                    'mmseg.models.backbones.resnet')},
}


@functools.lru_cache(maxsize=None)
def _known_blocks() -> Tuple[Tuple[Type[nn.Module], Callable, Pairs], ...]:
    """(class, its forward, pairs) of the importable entries of :data:`_BLOCKS`."""
    known = []
    for path, classes in _BLOCKS.items():
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        for name, pairs in classes.items():
            cls = getattr(module, name)
            known.append((cls, cls.forward, pairs))
    return tuple(known)


def _conv_module_pairs(module: nn.Module) -> Tuple[Optional[Type[nn.Module]], Pairs]:
    """mmcv's ``ConvModule`` and the (conv, norm) pair of ``module`` if it is one whose order
    chains them, else (None, ())."""
    try:
        from mmcv.cnn import ConvModule
    except ImportError:
        return None, ()
    if type(module).forward is not ConvModule.forward or not module.with_norm:
        return None, ()
    order = list(module.order)
    return (ConvModule, (('conv', 'norm'),)) if order.index('norm') == order.index('conv') + 1 \
        else (None, ())


def _chained(module: nn.Module) -> Iterator[Tuple[Type[nn.Module], nn.Module, nn.Module]]:
    """(structure, producer, consumer): the known class whose code runs ``module``'s forward,
    and children of ``module`` that this forward passes the producer's output to the consumer
    alone."""
    if type(module).forward is nn.Sequential.forward:
        children = list(module)
        for producer, consumer in zip(children, children[1:]):
            yield nn.Sequential, producer, consumer
        return
    structure, pairs = _conv_module_pairs(module)
    for cls, forward, block_pairs in _known_blocks():
        if isinstance(module, cls) and type(module).forward is forward:
            structure, pairs = cls, block_pairs
    for conv, norm in pairs:
        yield structure, getattr(module, conv, None), getattr(module, norm, None)


def mark_inplace_norms(model: nn.Module) -> List[nn.Module]:
    """Mark the BatchNorm layers of ``model`` that may normalize their input in place (see the
    module doc) and unmark the others.

    A marked layer holds ``(convolution, structure)`` under :data:`INPLACE_INPUT` in its
    ``__dict__``.

    Returns:
        the marked layers.
    """
    places = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    marks = {}
    for module in model.modules():
        for structure, conv, norm in _chained(module):
            if isinstance(conv, _QConvMixin) and isinstance(norm, _QBatchNormMixin) \
                    and places[id(norm)] == 1:
                marks[norm] = (conv, structure)
    for module in model.modules():
        module.__dict__.pop(INPLACE_INPUT, None)
    for norm, mark in marks.items():
        norm.__dict__[INPLACE_INPUT] = mark
    return list(marks)
