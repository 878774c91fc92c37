"""How a layer keeps what its backward needs: the one place that decides bits, device and bytes.

* :func:`save` keeps an activation: quantized when :func:`compresses` says so (the layer's
  family is compressed at this level, ``config.compressed_layers``, and the dtype is supported),
  else the tensor itself. The bit choice lives in :func:`bits_for`, the hook for mixed-precision
  allocation; an activation read by several layers is compressed once.
* :func:`save_packed` keeps a boolean mask (Dropout) at 1 bit per value or small integers
  (max-pool argmax offsets) at 4 or 8 bits, :func:`save_positive` where a tensor is positive
  (ReLU) at 1 bit per value, :func:`stash` any other exact tensor.
* With ``config.swap`` (L4), what is kept of a CUDA tensor is copied to pinned CPU memory and
  brought back in :func:`load`.
* :func:`save_activation` / :func:`saved_activation` put all of it on an autograd context; a
  full-precision activation goes through ``ctx.save_for_backward`` so in-place changes are caught.

Every layer records on its module the bytes kept by its last call (``actnn_saved_bytes``) and
what torch would have kept (``actnn_full_bytes``); :func:`held_bytes` tells how many bytes the
layers hold outside autograd's saved tensors right now, over all modules.
"""
import dataclasses
import math
import threading
import weakref
from typing import Dict, Optional, Tuple, Union

import torch

from ..allocate import allocator
from ..compress import FLOAT_DTYPES, CompressedTensor, dequantize, quantize
from ..compress.ops import apply_mask, apply_mask_transposed, pack_bits, pack_positive, unpack_bits
from ..config import config
from ..stats import step_log


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


Kept = Union[torch.Tensor, CompressedTensor, PackedInts]


@dataclasses.dataclass
class Offloaded:
    """What a layer keeps, moved to (pinned) CPU memory, and the device it goes back to."""

    value: Kept
    device: torch.device


Stored = Union[Kept, Offloaded]

_held_lock = threading.Lock()
_held = [0]
# id(activation) -> (weak activation, its version, quantization settings, weak stored copy)
_shared: Dict[int, Tuple[weakref.ref, int, tuple, weakref.ref]] = {}


def held_bytes() -> int:
    """Bytes the layers hold now for backward outside autograd's saved tensors, all modules."""
    return _held[0]


def _track(nbytes: int) -> None:
    with _held_lock:
        _held[0] += nbytes


def compresses(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether :func:`save` quantizes activation ``x`` of ``module``: its family is compressed
    at this level and its dtype can be quantized (not e.g. float64)."""
    return x.dtype in FLOAT_DTYPES and config.compresses(module._actnn_family)


def bits_for(x: torch.Tensor, module: torch.nn.Module) -> Union[int, torch.Tensor]:
    """Bit width(s) ``module`` stores activation ``x`` at (called once per quantized activation).

    Args:
        x: the activation the layer's backward needs (``compresses(x, module)`` holds).
        module: the layer.

    Returns:
        The configured uniform width, or with ``config.adaptive`` one width per sample chosen by
        the allocator within the layer's share of the budget.
    """
    if config.adaptive:
        return allocator.bits_for(module, x, float(config.bits), config.group_size,
                                  across_layers=module._actnn_family in ACROSS_LAYERS_FAMILIES)
    return config.bits


# Layers whose saved input enters only their weight gradient: their share of the bit budget is
# re-balanced across layers (see actnn_mm.allocate).
ACROSS_LAYERS_FAMILIES = ('conv', 'linear')

# A training step begins with the first activation kept after a backward pass has run.
_backward_ran = [False]


def step_boundary() -> None:
    """Start a new training step (allocator, stats) if a backward pass ran since the last save."""
    if _backward_ran[0]:
        _backward_ran[0] = False
        allocator.begin_step()
        step_log.begin_step()


def _keep(value: Kept, module: torch.nn.Module, full_bytes: int) -> Stored:
    """Account ``value`` to ``module`` and the live total; offload it for ``config.swap``."""
    nbytes = value.nbytes
    module.__dict__['actnn_saved_bytes'] = nbytes
    module.__dict__['actnn_full_bytes'] = full_bytes
    if isinstance(value, CompressedTensor):
        step_log.record(module, nbytes, full_bytes, value.bits.tolist(),
                        value.shape.numel() // max(value.bits.numel(), 1))
    else:
        step_log.record(module, nbytes, full_bytes)
    if config.swap and value.device.type == 'cuda':
        device = value.device
        value = value.to('cpu', non_blocking=True)  # a pinned copy for CUDA sources
        stored: Stored = Offloaded(value, device)
    else:
        stored = value
    _track(nbytes)
    weakref.finalize(value, _track, -nbytes)
    return stored


def save(x: torch.Tensor, module: torch.nn.Module) -> Union[torch.Tensor, Stored]:
    """Keep activation ``x`` of ``module`` for backward.

    An activation used by several layers (e.g. a ResNet block's input, read by ``conv1`` and the
    downsample conv) is compressed once and shared while it is unchanged, as torch shares one
    saved tensor.

    Returns:
        ``x`` itself when it stays in full precision (the caller must put it through
        ``ctx.save_for_backward``), else its :class:`CompressedTensor` (possibly offloaded).
    """
    step_boundary()
    if not compresses(x, module):
        module.__dict__['actnn_saved_bytes'] = module.__dict__['actnn_full_bytes'] = x.nbytes
        return x
    settings = (config.bits, config.group_size, config.stochastic, config.swap, config.adaptive)
    entry = _shared.get(id(x))
    if entry is not None and entry[0]() is x and entry[1:3] == (x._version, settings):
        stored = entry[3]()
        if stored is not None:  # another layer keeps this very activation already
            module.__dict__['actnn_saved_bytes'] = 0
            module.__dict__['actnn_full_bytes'] = x.nbytes
            return stored
    compressed = quantize(x, bits_for(x, module), config.group_size,
                          stochastic=config.stochastic)
    stored = _keep(compressed, module, x.nbytes)
    key = id(x)
    _shared[key] = (weakref.ref(x, lambda _, key=key: _shared.pop(key, None)), x._version,
                    settings, weakref.ref(stored))
    return stored


def stash(t: torch.Tensor, module: torch.nn.Module, full_bytes: int) -> Stored:
    """Keep exact tensor ``t`` (e.g. compact indices) of ``module``; torch would keep
    ``full_bytes`` instead."""
    step_boundary()
    return _keep(t, module, full_bytes)


def save_packed(t: torch.Tensor, bits: int, module: torch.nn.Module, full_bytes: int) -> Stored:
    """Keep ``t`` of ``module`` (bool, or uint8 below ``2**bits``) packed at ``bits`` per value;
    torch would keep ``full_bytes`` instead."""
    step_boundary()
    return _keep(pack_ints(t, bits), module, full_bytes)


def save_positive(t: torch.Tensor, module: torch.nn.Module) -> Stored:
    """Keep where ``t`` of ``module`` is positive, at 1 bit per value (torch would keep ``t``)."""
    step_boundary()
    return _keep(positive_mask(t), module, t.nbytes)


def _fetch(stored: Union[torch.Tensor, Stored]) -> Union[torch.Tensor, Kept]:
    """What was kept, back on its device; notes that a backward pass runs."""
    _backward_ran[0] = True
    if isinstance(stored, Offloaded):
        return stored.value.to(stored.device, non_blocking=True)
    return stored


def load(stored: Union[torch.Tensor, Stored],
         memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """The tensor :func:`save`, :func:`stash` or :func:`save_packed` was given (dequantized;
    a quantized activation in ``memory_format`` if given, see :func:`dequantize`)."""
    stored = _fetch(stored)
    if isinstance(stored, CompressedTensor):  # may become an input gradient (BatchNorm's)
        return _unviewed(dequantize(stored, memory_format))
    if isinstance(stored, PackedInts):
        return unpack_ints(stored)
    return stored


def masked(stored: Stored, values: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``values * scale`` where the boolean mask that :func:`save_packed` kept at 1 bit (or
    :func:`save_positive`) is True, 0 elsewhere: one pass over ``values``, no unpacked mask (ReLU
    and dropout backward).

    Args:
        stored: what :func:`save_packed` or :func:`save_positive` returned for a mask of
            ``values``' shape.
        values: e.g. the output gradient, in any layout.
        scale: the factor where the mask is set.
    """
    packed = _fetch(stored)
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
    return _unviewed(out.permute(sorted(range(len(order)), key=lambda i: order[i])))


def _unviewed(t: torch.Tensor) -> torch.Tensor:
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


def save_activation(ctx: torch.autograd.function.FunctionCtx, module: torch.nn.Module,
                    x: Optional[torch.Tensor], *exact: Optional[torch.Tensor]) -> None:
    """Keep activation ``x`` (None if backward needs none) and exact tensors on ``ctx``.

    The exact tensors (weights, statistics) and a full-precision ``x`` go through
    ``ctx.save_for_backward``; a compressed ``x`` stays on ``ctx`` until :func:`saved_activation`.
    """
    if x is None:
        module.__dict__['actnn_saved_bytes'] = module.__dict__['actnn_full_bytes'] = 0
        stored = None
    else:
        stored = save(x, module)
    ctx.actnn_plain = isinstance(stored, torch.Tensor)
    # The allocator learns from the gradient reaching a layer whose activation it sized.
    ctx.actnn_module = module if config.adaptive and not ctx.actnn_plain else None
    if ctx.actnn_plain:
        ctx.save_for_backward(stored, *exact)
        ctx.actnn_stored = None
    else:
        ctx.save_for_backward(*exact)
        ctx.actnn_stored = stored


def saved_activation(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor,
                     memory_format: Optional[torch.memory_format] = None
                     ) -> Tuple[Optional[torch.Tensor], ...]:
    """``(x, *exact)`` as given to :func:`save_activation`; drops the compressed copy from ctx.

    Args:
        ctx: the context :func:`save_activation` filled.
        grad: the gradient of the layer's output (for the adaptive allocator).
        memory_format: layout wanted for a compressed ``x`` (see :func:`dequantize`); a
            full-precision ``x`` comes back as it was saved.
    """
    if ctx.actnn_plain:
        return ctx.saved_tensors
    if ctx.actnn_module is not None:
        allocator.observe_grad(ctx.actnn_module, grad)
    stored, ctx.actnn_stored = ctx.actnn_stored, None
    return (None if stored is None else load(stored, memory_format), *ctx.saved_tensors)


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
