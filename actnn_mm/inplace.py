"""Which BatchNorm layers may normalize their input in place: those that a model's forward feeds
with a convolution's output and nothing else reads.

A training BatchNorm that keeps its input compressed needs no full-precision copy of it, so it
can write its output over the convolution's output and the forward pass holds one
activation-sized tensor fewer at its peak (the largest term of the peak at 2 bits). Whether
anything else reads that tensor is a property of the forward code, not of the modules, so it is
known for a fixed set of structures only:

* consecutive (convolution, BatchNorm) children of a plain ``nn.Sequential``;
* mmcv's ``ConvModule`` whose order puts 'norm' right after 'conv';
* the stems and residual blocks of the ResNet families of torchvision, mmpretrain, mmdet and
  mmseg (``conv1 -> norm1`` and so on), as long as the class keeps that library's forward.

At run time a marked layer still normalizes in place only when its input was made by an ActNN
convolution in this forward (:func:`~actnn_mm.layers.conv.made_by_conv`), so a layer reached
some other way (e.g. a deformable convolution in a block) takes the copying path.
"""
import functools
import importlib
from typing import Callable, Dict, Iterator, List, Tuple, Type

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


def _conv_module_pairs(module: nn.Module) -> Pairs:
    """The (conv, norm) pair of an mmcv ``ConvModule`` whose order chains them, else ()."""
    try:
        from mmcv.cnn import ConvModule
    except ImportError:
        return ()
    if type(module).forward is not ConvModule.forward or not module.with_norm:
        return ()
    order = list(module.order)
    return (('conv', 'norm'),) if order.index('norm') == order.index('conv') + 1 else ()


def _chained(module: nn.Module) -> Iterator[Tuple[nn.Module, nn.Module]]:
    """(producer, consumer) children of ``module`` whose forward passes the producer's output
    to the consumer alone."""
    if type(module).forward is nn.Sequential.forward:
        children = list(module)
        yield from zip(children, children[1:])
        return
    pairs: Pairs = _conv_module_pairs(module)
    for cls, forward, block_pairs in _known_blocks():
        if isinstance(module, cls) and type(module).forward is forward:
            pairs = block_pairs
    for conv, norm in pairs:
        yield getattr(module, conv, None), getattr(module, norm, None)


def mark_inplace_norms(model: nn.Module) -> List[nn.Module]:
    """Mark the BatchNorm layers of ``model`` that may normalize their input in place (see the
    module doc) and unmark the others.

    Returns:
        the marked layers.
    """
    marked = []
    for module in model.modules():
        for conv, norm in _chained(module):
            if isinstance(conv, _QConvMixin) and isinstance(norm, _QBatchNormMixin):
                marked.append(norm)
    for module in model.modules():
        module.__dict__.pop(INPLACE_INPUT, None)
    for norm in marked:
        norm.__dict__[INPLACE_INPUT] = True
    return marked
