"""Exact small integers and masks packed in memory order, and the masks' backward in any layout.

ReLU keeps where its output is positive and dropout its mask at 1 bit per value, max pooling the
position of each argmax in its window at 4 or 8 bits, each in the memory order of the tensor they
describe (no copy of its layout). A mask is applied to a gradient in one pass, even when the
gradient's layout differs (channels_last against NCHW): the kernels read it transposed.
"""
import dataclasses
import math
from typing import Optional, Tuple, Union

import torch

from ..compress import FLOAT_DTYPES
from ..compress.ops import apply_mask, apply_mask_transposed, pack_bits, pack_positive, unpack_bits


@dataclasses.dataclass
class PackedInts:
    """Small non-negative integers (or booleans) packed ``8 // bits`` per byte, in memory order.

    Attributes:
        data: uint8 packed values, value ``i`` in bits ``[b * (i % k), b * (i % k + 1))`` of byte
            ``i // k`` for ``b = bits`` and ``k = 8 // bits``.
        shape: shape of the original tensor.
        permutation: dims of the original in memory order (None when contiguous).
        bits: bits per value (1, 2, 4 or 8).
        dtype: dtype of the original (bool or uint8).
    """

    data: torch.Tensor
    shape: torch.Size
    permutation: Optional[Tuple[int, ...]]
    bits: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        """Device of the packed values."""
        return self.data.device

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> 'PackedInts':
        """A copy on ``device``."""
        return dataclasses.replace(self, data=self.data.to(device, non_blocking=non_blocking))


def apply_packed_mask(packed: PackedInts, values: torch.Tensor,
                      scale: float = 1.0) -> torch.Tensor:
    """``values * scale`` where the 1-bit ``packed`` mask is True, 0 elsewhere: one pass over
    ``values``, no unpacked mask (ReLU and dropout backward).

    Args:
        packed: a 1-bit mask of ``values``' shape, in any layout.
        values: e.g. the output gradient, in any layout.
        scale: the factor where the mask is set.
    """
    if values.dtype not in FLOAT_DTYPES:  # e.g. float64: the kernel serves the codec's dtypes
        return values * unpack_ints(packed) * scale
    order = packed.permutation or tuple(range(values.dim()))  # the mask's memory order
    layout = _dense_order(values)
    split = _rotation(order, layout) if layout is not None else None
    if split is None:  # the same layout, or one no kernel reads across
        out = apply_mask(values.permute(order).contiguous(), packed.data, scale)
    else:
        # values' memory order is the mask's with its dims [1, split) moved last (a
        # channels_last gradient and the mask of an NCHW activation, or the other way round):
        # per sample, a transposed (rows, cols) matrix
        order = order[:1] + order[split:] + order[1:split]
        view = values.permute(order)
        rows = math.prod(view.shape[len(order) - split + 1:])
        out = apply_mask_transposed(view.reshape(view.shape[0], -1, rows), packed.data, scale)
        out = out.view(view.shape)
    return unviewed(out.permute(sorted(range(len(order)), key=lambda i: order[i])))


def unviewed(t: torch.Tensor) -> torch.Tensor:
    """``t``, a view of a kernel's output, as a tensor that does not hold that output: autograd
    sums two gradients of one tensor in place of either only if nothing else holds its memory,
    and a view holds its base (ResNet-50's residual gradients were summed into 12 new tensors a
    step, each faulted in fresh, while the masks' results were views)."""
    return t.detach()


def _rotation(mask_order: Tuple[int, ...], values_order: Tuple[int, ...]) -> Optional[int]:
    """The ``split`` for which ``values_order`` is ``mask_order`` with its dims ``[1, split)``
    moved last, or None."""
    for split in range(2, len(mask_order)):
        if values_order == mask_order[:1] + mask_order[split:] + mask_order[1:split]:
            return split
    return None


def _dense_order(x: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """The dims of ``x`` from outermost to innermost in memory if ``x`` is a permutation of a
    contiguous tensor, else None."""
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return order if x.permute(order).is_contiguous() else None


def _memory_order(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, ...]]]:
    """A contiguous view of ``x`` with dims in memory order, and that order (None if identity)."""
    if x.is_contiguous():
        return x, None
    order = _dense_order(x)
    if order is not None:
        return x.permute(order), order
    return x.contiguous(), None


def pack_ints(t: torch.Tensor, bits: int) -> PackedInts:
    """Pack ``t`` (bool, or uint8 values below ``2**bits``) at ``bits`` (1, 2, 4 or 8) per value,
    in its memory order (no copy of the layout)."""
    ordered, permutation = _memory_order(t)
    return PackedInts(pack_bits(ordered, bits), t.shape, permutation, bits, t.dtype)


def positive_mask(t: torch.Tensor) -> PackedInts:
    """``pack_ints(t > 0, 1)`` in one pass for the codec's dtypes."""
    if t.dtype not in FLOAT_DTYPES:
        return pack_ints(t > 0, 1)
    ordered, permutation = _memory_order(t)
    return PackedInts(pack_positive(ordered), t.shape, permutation, 1, torch.bool)


def unpack_ints(packed: PackedInts) -> torch.Tensor:
    """The tensor :func:`pack_ints` packed, with its shape, dtype and layout."""
    values = unpack_bits(packed.data, packed.bits, packed.shape.numel()).view(packed.dtype)
    if packed.permutation is None:
        return values.reshape(packed.shape)
    order = packed.permutation
    ordered = values.reshape([packed.shape[d] for d in order])
    return ordered.permute(sorted(range(len(order)), key=lambda i: order[i]))
