"""The knobs of activation compression: one validated :data:`config` object and the L0-L5 levels.

``set_optimization_level`` sets every knob at once, as in ActNN:

====== ========================================================================================
level  meaning
====== ========================================================================================
L0     no compression: :func:`actnn_mm.QModule` converts nothing, layers keep full precision
L1     4-bit per-group compression of the conv layers only (plus lossless ReLU/Dropout/MaxPool)
L2     4-bit per-group compression of all layers
L3     2 bits per value on average (2.0625 with the group statistics), mixed precision per
       sample and per layer (:mod:`actnn_mm.allocate`)
L4     L3 + compressed activations swapped to pinned CPU memory when they live on CUDA
L5     L4 + the CUDA caching allocator's ``expandable_segments`` (against fragmentation)
====== ========================================================================================

The knobs can also be set one by one (``actnn_mm.config.group_size = 128``); every assignment is
validated and unknown names are refused, so a typo cannot silently do nothing.
"""
import dataclasses
import logging
import os
import warnings
from typing import Any, Callable, Dict, List, Tuple, Union

import torch

from .compress import SUPPORTED_BITS
from .compress.codec import statistics_bits

logger = logging.getLogger('actnn_mm')

LEVELS = ('L0', 'L1', 'L2', 'L3', 'L4', 'L5')
COMPRESSED_LAYERS = ('none', 'conv', 'all')
# Families whose layers keep an exact 1-bit mask or compact indices: converting them loses nothing,
# so L1 converts them too (else a ReLU would keep the full tensor that its conv compresses).
LOSSLESS_FAMILIES = ('relu', 'dropout', 'pool')
_ALLOC_CONF_VARS = ('PYTORCH_ALLOC_CONF', 'PYTORCH_CUDA_ALLOC_CONF')
_EXPANDABLE = 'expandable_segments:True'
# L3-L5's budget: 2 bits per value on average and their group statistics (at group_size 256)
ADAPTIVE_BUDGET = 2 + statistics_bits(256)


@dataclasses.dataclass
class Config:
    """Activation compression settings, read by the layers at every forward pass.

    Attributes:
        level: the optimization level ('L0'..'L5'); assigning it sets the other knobs as in
            the table above.
        activation_compression_bits: ActNN-style list whose first entry is the bit width of the
            compressed activations (1, 2, 4 or 8; the group statistics come on top), or with
            ``adaptive`` their average budget per value, group statistics included (1/16 bit at
            ``group_size`` 256), any real number from 1 + that to 8 (e.g. 1.5; L3-L5: 2.0625).
        group_size: values per quantization group (a positive multiple of 8).
        stochastic: stochastic (unbiased) rounding; False rounds to nearest (biased gradients).
        compressed_layers: which layer families compress their saved activations and which
            :func:`actnn_mm.QModule` converts: 'none' (L0), 'conv' (L1: convolutions, and the
            lossless ReLU, Dropout and MaxPool2d) or 'all'. ReLU, Dropout and MaxPool2d keep
            lossless 1-bit masks / compact indices.
        adaptive: per-sample, per-layer mixed precision (ActNN's L3): the allocator chooses 1, 2,
            4 or 8 bits per sample and layer with ``activation_compression_bits[0]`` as the
            element-weighted average.
        swap: move compressed activations of CUDA tensors to pinned CPU memory until backward.
        expandable_segments: enable the CUDA caching allocator's expandable segments (set when
            True is assigned; effective only if CUDA is not initialised yet).
    """

    level: str = 'L3'
    activation_compression_bits: List[Union[int, float]] = dataclasses.field(
        default_factory=lambda: [ADAPTIVE_BUDGET])
    group_size: int = 256
    stochastic: bool = True
    compressed_layers: str = 'all'
    adaptive: bool = True
    swap: bool = False
    expandable_segments: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _VALIDATORS:
            raise AttributeError(f'actnn_mm.config has no setting {name!r}; settings: '
                                 f'{", ".join(_VALIDATORS)}')
        value = _VALIDATORS[name](value)
        if name in ('activation_compression_bits', 'adaptive', 'group_size'):
            settings = {**self.__dict__, name: value}
            bits = settings.get('activation_compression_bits', [2])[0]
            group_size = settings.get('group_size', 256)
            if not settings.get('adaptive', True) and bits not in SUPPORTED_BITS:
                raise ValueError(f'actnn_mm.config: {bits!r} bits is a budget the adaptive '
                                 f'allocator (L3-L5) spreads over samples and layers; without it '
                                 f'(adaptive=False, L1, L2) the width must be one of '
                                 f'{SUPPORTED_BITS}: set activation_compression_bits (e.g. [2]) '
                                 f'first')
            if settings.get('adaptive', True) and bits - statistics_bits(group_size) < 1:
                raise ValueError(f'actnn_mm.config: an average budget of {bits!r} bits per value '
                                 f'leaves less than 1 bit for the values once the group '
                                 f'statistics are paid ({statistics_bits(group_size):g} bits per '
                                 f'value at group_size {group_size}): raise the budget to at '
                                 f'least {1 + statistics_bits(group_size):g} or the group size')
        super().__setattr__(name, value)
        if name == 'level':
            knobs = _LEVEL_SETTINGS[value]
            # a level's bits and adaptive agree with each other, not with the other's old value
            super().__setattr__('adaptive', knobs['adaptive'])
            super().__setattr__('activation_compression_bits', knobs['activation_compression_bits'])
            for knob, setting in knobs.items():
                setattr(self, knob, setting)
        elif name == 'expandable_segments' and value:
            _enable_expandable_segments()

    @property
    def bits(self) -> Union[int, float]:
        """The uniform bit width of compressed activations, or with ``adaptive`` their average
        budget (a real number between 1 and 8)."""
        return self.activation_compression_bits[0]

    def compresses(self, family: str) -> bool:
        """Whether layers of ``family`` ('conv' or another family name) are converted and
        compress what they save (lossless masks and indices for the families that allow it)."""
        return self.compressed_layers == 'all' or (self.compressed_layers == 'conv'
                                                   and family in ('conv',) + LOSSLESS_FAMILIES)


def _flag(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f'actnn_mm.config.{name} must be a bool, got {value!r}')
        return value
    return check


def _choice(name: str, choices: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f'actnn_mm.config.{name} must be one of {", ".join(choices)}, '
                             f'got {value!r}')
        return value
    return check


def _bits_list(value: Any) -> List[Union[int, float]]:
    if isinstance(value, (int, float, str, bytes)) or not value or any(
            isinstance(b, bool) or not isinstance(b, (int, float)) or not 1 <= b <= 8
            for b in value):
        raise ValueError(f'actnn_mm.config.activation_compression_bits must be a non-empty list '
                         f'whose first entry is a width in {SUPPORTED_BITS} (or, with adaptive '
                         f'allocation, an average budget between 1 and 8), got {value!r}')
    return [int(b) if float(b).is_integer() else b for b in value]  # 2.0 is the width 2


def _group_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(f'actnn_mm.config.group_size must be a positive multiple of 8, '
                         f'got {value!r}')
    return value


def _level(value: Any) -> str:
    if value not in LEVELS:
        raise ValueError(f'actnn_mm: unknown optimization level {value!r}; valid levels: '
                         f'{", ".join(LEVELS)}')
    return value


_VALIDATORS: Dict[str, Callable[[Any], Any]] = {
    'level': _level,
    'activation_compression_bits': _bits_list,
    'group_size': _group_size,
    'stochastic': _flag('stochastic'),
    'compressed_layers': _choice('compressed_layers', COMPRESSED_LAYERS),
    'adaptive': _flag('adaptive'),
    'swap': _flag('swap'),
    'expandable_segments': _flag('expandable_segments'),
}

_LEVEL_SETTINGS: Dict[str, Dict[str, Any]] = {
    'L0': dict(compressed_layers='none', adaptive=False, activation_compression_bits=[8],
               swap=False, expandable_segments=False),
    'L1': dict(compressed_layers='conv', adaptive=False, activation_compression_bits=[4],
               swap=False, expandable_segments=False),
    'L2': dict(compressed_layers='all', adaptive=False, activation_compression_bits=[4],
               swap=False, expandable_segments=False),
    'L3': dict(compressed_layers='all', adaptive=True,
               activation_compression_bits=[ADAPTIVE_BUDGET], swap=False,
               expandable_segments=False),
    'L4': dict(compressed_layers='all', adaptive=True,
               activation_compression_bits=[ADAPTIVE_BUDGET], swap=True, expandable_segments=False),
    'L5': dict(compressed_layers='all', adaptive=True,
               activation_compression_bits=[ADAPTIVE_BUDGET], swap=True, expandable_segments=True),
}

config = Config()


def set_optimization_level(level: str) -> None:
    """Set all knobs of :data:`config` to those of an ActNN optimization level.

    Call it before :func:`actnn_mm.QModule` (which converts according to the level); the layers
    read the other knobs at every forward pass. L5 enables the CUDA allocator's expandable
    segments, which only takes effect if CUDA is not initialised yet (a warning says otherwise).

    Args:
        level: 'L0', 'L1', 'L2', 'L3', 'L4' or 'L5'.

    Raises:
        ValueError: ``level`` is not one of them.
    """
    config.level = level


def _enable_expandable_segments() -> None:
    """Add ``expandable_segments:True`` to the allocator configuration read at CUDA start-up."""
    names = [name for name in _ALLOC_CONF_VARS if os.environ.get(name)] or [_ALLOC_CONF_VARS[0]]
    for name in names:
        current = os.environ.get(name, '')
        if 'expandable_segments' not in current:
            os.environ[name] = f'{current},{_EXPANDABLE}' if current else _EXPANDABLE
    if torch.cuda.is_initialized():
        warnings.warn('actnn_mm: CUDA is already initialised, so expandable_segments (L5) takes '
                      'effect only in processes started from now on; set the optimization level '
                      f'before any CUDA work, or export {names[0]}={_EXPANDABLE}', stacklevel=3)
    else:
        logger.info('actnn_mm: %s=%s', names[0], os.environ[names[0]])
