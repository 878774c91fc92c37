"""How a layer keeps what its backward needs: the one place that decides bits, device and bytes.

* :func:`save` keeps an activation: quantized when :func:`compresses` says so (the layer's
  family is compressed at this level, ``config.compressed_layers``, and the dtype is supported),
  else the tensor itself. The bits come from :func:`bits_for` (the model's allocator at L3); an
  activation read by several layers of a model is compressed once.
* :func:`save_packed` keeps a boolean mask (Dropout) at 1 bit per value or small integers
  (max-pool argmax offsets) at 4 or 8 bits, :func:`save_positive` where a tensor is positive
  (ReLU) at 1 bit per value (:mod:`.packed`), :func:`stash` any other exact tensor.
* With ``config.swap`` (L4), what is kept of a CUDA tensor is copied to pinned CPU memory and
  brought back in :func:`load` (:mod:`.swap`).
* :func:`save_activation` / :func:`saved_activation` put all of it on an autograd context; a
  full-precision activation goes through ``ctx.save_for_backward`` so in-place changes are caught.

What is kept belongs to the layer's model (:mod:`.state`): its step log records it, and reading
it in backward marks the step as done. Every layer records on its module the bytes kept by its
last call (``actnn_saved_bytes``) and what torch would have kept (``actnn_full_bytes``);
:func:`held_bytes` tells how many bytes the layers hold outside autograd's saved tensors right
now, over all models.
"""
import dataclasses
import threading
import weakref
from typing import Optional, Tuple, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..allocate import NORM, WEIGHT
from ..compress import FLOAT_DTYPES, CompressedTensor, dequantize, quantize
from ..compress.codec import checks_at_once, not_finite
from ..config import config
from .packed import PackedInts, apply_packed_mask, pack_ints, positive_mask, unpack_ints, unviewed
from .state import ModelState, state_of
from .swap import Kept, bring_back, offload

@dataclasses.dataclass
class Held:
    """What a layer keeps for backward, and whose it is.

    Attributes:
        value: the kept tensor, quantized activation or packed integers (in pinned CPU memory
            when offloaded).
        state: the state of the layer's model.
        device: where ``value`` goes back to in backward when offloaded (L4), else None.
    """

    value: Kept
    state: ModelState
    device: Optional[torch.device] = None


_held_lock = threading.Lock()
_held = [0]


def held_bytes() -> int:
    """Bytes the layers hold now for backward outside autograd's saved tensors, all models."""
    return _held[0]


def _track(nbytes: int) -> None:
    with _held_lock:
        _held[0] += nbytes


def compresses(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether :func:`save` quantizes activation ``x`` of ``module``: its family is compressed
    at this level and its dtype can be quantized (not e.g. float64)."""
    return x.dtype in FLOAT_DTYPES and config.compresses(module._actnn_family)


# torch.utils.checkpoint's non-reentrant mode saves through these saved-tensor hooks: in the
# forward it drops what is saved, and recomputes it inside backward.
_CHECKPOINT_HOOKS = {'_checkpoint_hook': 'forward', '_recomputation_hook': 'recompute'}


def _checkpoint_phase() -> Optional[str]:
    """'forward' or 'recompute' inside a non-reentrant checkpoint region, else None."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return None
    return _CHECKPOINT_HOOKS.get(hooks[0].__qualname__.split('.', 1)[0])


def allocation_kind(module: torch.nn.Module) -> Optional[str]:
    """How the allocator models ``module`` (:mod:`actnn_mm.allocate`): WEIGHT for the layers
    whose saved input enters only their weight gradient, NORM for batch norms, None for the
    rest."""
    if module._actnn_family in ('conv', 'linear'):
        return WEIGHT
    if isinstance(module, _BatchNorm):
        return NORM
    return None


def bits_for(x: torch.Tensor, module: torch.nn.Module, state: ModelState
             ) -> Tuple[Union[int, torch.Tensor], Optional[float]]:
    """Bit width(s) ``module`` stores activation ``x`` at (called once per quantized activation).

    Args:
        x: the activation the layer's backward needs (``compresses(x, module)`` holds).
        module: the layer.
        state: its model's state.

    Returns:
        The configured uniform width and None, or with ``config.adaptive`` one width per sample
        chosen by the allocator (on ``x``'s device) within the layer's share of the budget (what
        the group statistics leave of it), and that share (the most the widths' mean is: it
        sizes the buffer without reading them).
    """
    if config.adaptive:
        return state.allocator.bits_for(
            module, x, float(config.bits), config.group_size, allocation_kind(module))
    return config.bits, None


def _current_state(module: torch.nn.Module) -> ModelState:
    """The state of ``module``'s model, a new step begun if its backward ran since (every save
    goes through here)."""
    state = state_of(module)
    state.step_boundary()
    return state


def _keep(value: Kept, module: torch.nn.Module, state: ModelState, full_bytes: int) -> Held:
    """Account ``value`` to ``module``, its model's step and the live total; offload it for
    ``config.swap``."""
    nbytes = value.nbytes
    module.__dict__['actnn_saved_bytes'] = nbytes
    module.__dict__['actnn_full_bytes'] = full_bytes
    if isinstance(value, CompressedTensor):
        state.step_log.record(module, nbytes, full_bytes, value.bits,
                              value.shape.numel() // max(value.bits.numel(), 1),
                              value.statistics_nbytes)
        if not checks_at_once(value.device):  # quantize left the NaN/Inf check to us
            state.step_log.watch(not_finite(value), type(module).__name__)
    elif _checkpoint_phase() != 'recompute':  # a recomputed forward's masks go unused
        state.step_log.record(module, nbytes, full_bytes)
    held = offloaded(value, state)
    _track(nbytes)
    weakref.finalize(held.value, _track, -nbytes)
    return held


def save(x: torch.Tensor, module: torch.nn.Module) -> Union[torch.Tensor, Held]:
    """Keep activation ``x`` of ``module`` for backward.

    An activation used by several layers of a model (e.g. a ResNet block's input, read by
    ``conv1`` and the downsample conv) is compressed once and shared while it is unchanged, as
    torch shares one saved tensor. In a non-reentrant checkpoint region (``torch.utils.
    checkpoint(..., use_reentrant=False)``, mmengine's ``activation_checkpointing``) activations
    stay in full precision: the checkpoint drops them and recomputes them in backward, which
    saves more than compressing (a reentrant checkpoint runs its forward without gradients, and
    its recomputation compresses as any forward does).

    Returns:
        ``x`` itself when it stays in full precision (the caller must put it through
        ``ctx.save_for_backward``), else what is held of it.
    """
    state = _current_state(module)
    if not compresses(x, module) or _checkpoint_phase() is not None:
        module.__dict__['actnn_saved_bytes'] = module.__dict__['actnn_full_bytes'] = x.nbytes
        return x
    settings = (config.bits, config.group_size, config.stochastic, config.swap, config.adaptive)
    entry = state.shared.get(id(x))
    if entry is not None and entry[0]() is x and entry[1:3] == (x._version, settings):
        held = entry[3]()
        if held is not None:  # another layer keeps this very activation already
            module.__dict__['actnn_saved_bytes'] = 0
            module.__dict__['actnn_full_bytes'] = x.nbytes
            return held
    bits, budget = bits_for(x, module, state)
    compressed = quantize(x, bits, config.group_size, stochastic=config.stochastic,
                          budget=budget, defer_check=True)
    held = _keep(compressed, module, state, x.nbytes)
    key, shared = id(x), state.shared
    shared[key] = (weakref.ref(x, lambda _, key=key: shared.pop(key, None)), x._version,
                   settings, weakref.ref(held))
    return held


def stash(t: torch.Tensor, module: torch.nn.Module, full_bytes: int) -> Held:
    """Keep exact tensor ``t`` (e.g. compact indices) of ``module``; torch would keep
    ``full_bytes`` instead."""
    state = _current_state(module)
    return _keep(t, module, state, full_bytes)


def save_packed(t: torch.Tensor, bits: int, module: torch.nn.Module, full_bytes: int) -> Held:
    """Keep ``t`` of ``module`` (bool, or uint8 below ``2**bits``) packed at ``bits`` per value;
    torch would keep ``full_bytes`` instead."""
    state = _current_state(module)
    return _keep(pack_ints(t, bits), module, state, full_bytes)


def save_positive(t: torch.Tensor, module: torch.nn.Module) -> Held:
    """Keep where ``t`` of ``module`` is positive, at 1 bit per value (torch would keep ``t``)."""
    state = _current_state(module)
    return _keep(positive_mask(t), module, state, t.nbytes)


def offloaded(value: Kept, state: ModelState) -> Held:
    """``value`` held for ``state``'s model: in pinned CPU memory for ``config.swap`` (L4) if it
    lives on a CUDA device, else as it is."""
    if config.swap and value.device.type == 'cuda':
        return Held(offload(value, state.swap_stream(value.device)), state, value.device)
    return Held(value, state)


def _fetch(held: Held) -> Kept:
    """What was kept, back on its device; notes that the model's backward runs."""
    held.state.backward_runs()
    if held.device is not None:
        return bring_back(held.value, held.device, held.state.swap_stream(held.device))
    return held.value


def load(held: Held, memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """The tensor :func:`save`, :func:`stash` or :func:`save_packed` was given (dequantized;
    a quantized activation in ``memory_format`` if given, see :func:`dequantize`)."""
    value = _fetch(held)
    if isinstance(value, CompressedTensor):  # may become an input gradient (BatchNorm's)
        return unviewed(dequantize(value, memory_format))
    if isinstance(value, PackedInts):
        return unpack_ints(value)
    return value


def masked(held: Held, values: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``values * scale`` where the boolean mask that :func:`save_packed` kept at 1 bit (or
    :func:`save_positive`) is True, 0 elsewhere (see :func:`.packed.apply_packed_mask`).

    Args:
        held: what :func:`save_packed` or :func:`save_positive` returned for a mask of
            ``values``' shape.
        values: e.g. the output gradient, in any layout.
        scale: the factor where the mask is set.
    """
    return apply_packed_mask(_fetch(held), values, scale)


def save_activation(ctx: torch.autograd.function.FunctionCtx, module: torch.nn.Module,
                    x: Optional[torch.Tensor], *exact: Optional[torch.Tensor]) -> None:
    """Keep activation ``x`` (None if backward needs none) and exact tensors on ``ctx``.

    The exact tensors (weights, statistics) and a full-precision ``x`` go through
    ``ctx.save_for_backward``; a compressed ``x`` stays on ``ctx`` until :func:`saved_activation`.
    """
    if x is None:
        module.__dict__['actnn_saved_bytes'] = module.__dict__['actnn_full_bytes'] = 0
        held = None
    else:
        held = save(x, module)
    ctx.actnn_plain = isinstance(held, torch.Tensor)
    # The allocator learns from the gradient reaching a layer whose activation it sized.
    ctx.actnn_module = module if config.adaptive and isinstance(held, Held) else None
    if ctx.actnn_plain:
        ctx.save_for_backward(held, *exact)
        ctx.actnn_held = None
    else:
        ctx.save_for_backward(*exact)
        ctx.actnn_held = held


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
    held, ctx.actnn_held = ctx.actnn_held, None
    if ctx.actnn_module is not None:
        held.state.allocator.observe_grad(ctx.actnn_module, grad)
    return (None if held is None else load(held, memory_format), *ctx.saved_tensors)
