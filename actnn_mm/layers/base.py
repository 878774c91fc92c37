"""What all ActNN layers share: their identity (torch class, family) and the fast-path tests."""
from typing import Optional, Tuple

import torch

from ..compress import FLOAT_DTYPES


class QLayer:
    """Mixin of every ActNN layer, placed before the torch class it extends.

    Attributes:
        _actnn_base: the torch.nn class the layer replaces (what :func:`actnn_mm.revert` restores).
        _actnn_family: 'conv', 'linear', 'norm', 'act' (GELU, SiLU), 'relu', 'dropout' or
            'pool'; decides whether the layer is converted and compressed at a level
            (``config.compressed_layers``).
    """

    _actnn_base: type
    _actnn_family: str


def grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will need a backward through an op on ``tensors`` (else: plain op)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never for devices autocast does not know,
    e.g. 'meta')."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_inputs(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """``tensors`` cast as autocast would for a matmul-like op (conv, linear) on their device.

    Casting before the autograd Function makes the layer save (and compress) the activation in
    the autocast dtype, as torch does; the casts' own backward returns gradients in the original
    dtypes.
    """
    device_type = tensors[0].device.type
    if not autocast_on(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in FLOAT_DTYPES else t
                 for t in tensors)


def channels_last_layout(t: torch.Tensor) -> Optional[torch.memory_format]:
    """``torch.channels_last`` when 4-D ``t`` is in that layout and not contiguous (e.g. the
    input gradient of an activation-heavy CPU convolution), else None: a backward pass given
    such a gradient works in its layout, as a mix of layouts makes torch's kernels copy."""
    if t.dim() == 4 and not t.is_contiguous() \
            and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None
