"""Generic mode: compress what any op saves for backward, and report what stays uncompressed.

ActNN layers cover the layers they replace. Everything else a model computes in training
(attention matmuls, softmax, functional activations, custom ops) keeps its tensors through
autograd's saved tensors. :class:`compress_saved_tensors` installs the public
``torch.autograd.graph.saved_tensors_hooks``: each saved floating tensor is quantized like a
layer's activation (dim 0 as the sample axis, ``config.group_size``, ``config.stochastic``, the
configured bits) when the op saves it, and dequantized each time backward unpacks it. ::

    with actnn_mm.compress_saved_tensors(model) as generic:
        loss = model(x).sum()   # packing happens here
    loss.backward()             # works outside the context
    print(generic.stats)

Left in full precision, with the reason counted in :attr:`GenericStats.kept_bytes`:

* parameters and buffers of ``model``, views of parameters and autocast copies of parameters
  that train (not counted: they are held anyway);
* 'type': non-floating tensors (indices, masks), float64, non-strided layouts;
* 'shape': tensors of fewer than 2 dims (no sample axis);
* 'small': tensors below ``min_bytes`` (64 KiB by default: per-group statistics, biases, small
  heads; each compression costs a kernel call and about 20 bytes of bookkeeping per sample,
  while the activations worth compressing take megabytes);
* 'norm': whatever is saved inside a normalization module of ``model`` that is not an ActNN
  layer (a BatchNorm/GroupNorm/LayerNorm subclass with its own forward, a layer the level does
  not convert): their backward normalizes the saved input with the exact statistics, which
  multiplies its rounding error by 1/std (hundreds of times when a channel has few values).
  Functional ``F.batch_norm`` / ``F.layer_norm`` calls outside such modules are not detected.

A tensor saved by several ops (a softmax output read by the next matmul, ``x * x``) is compressed
once: saves are matched by storage, offset, shape, strides, dtype and version while the tensor
lives. ActNN layers keep their compressed activations on the autograd context, not in saved
tensors, so generic mode never sees them; what they do save (weights, per-channel statistics)
is filtered out above.

Gradients stay unbiased for ops whose backward is linear in each saved tensor (matmul, mul,
convolution, linear, interpolation, pooling). For ops whose backward is nonlinear in a saved
tensor (softmax and sigmoid outputs, ``F.gelu`` / ``F.layer_norm`` inputs, the thresholds of
``F.relu`` / ``clamp``) they are slightly biased at low bits and close at 8 bits: the ActNN layers
(QLayerNorm, QGELU, QReLU, ...) are exact or unbiased there, so convert first.

``torch.compile`` defeats saved-tensor hooks (compiled graphs unpack all saved tensors at once,
pytorch issue 148222): under it, generic mode saves no memory.
"""
import collections
import dataclasses
import functools
import itertools
import logging
import weakref
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn

from .compress import FLOAT_DTYPES, SUPPORTED_BITS, quantize
from .config import config
from .layers.base import QLayer
from .layers.saved import Offloaded, Stored, load, step_boundary
from .stats import step_log

logger = logging.getLogger('actnn_mm')

DEFAULT_MIN_BYTES = 64 * 1024
# Normalization modules (and their subclasses, e.g. mmpretrain's LayerNorm2d).
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)
REPORT_MIN_BYTES = 1 << 20
# Our saved-tensor hooks now active (generic mode, counters): the innermost hooks see every
# save, so the first-step report stays out of their way.
_active_hooks: List[Any] = []


@dataclasses.dataclass
class GenericStats:
    """What generic mode kept for backward since its context was entered.

    Attributes:
        compressed: distinct tensors compressed.
        shared: saves served by the compressed copy of a tensor saved before.
        saved_bytes: bytes of the compressed copies.
        full_bytes: bytes the same tensors take in full precision (what torch would keep).
        kept_bytes: bytes of saved tensors left in full precision, by reason ('type', 'shape',
            'small', 'norm'), counted at each save.
    """

    compressed: int = 0
    shared: int = 0
    saved_bytes: int = 0
    full_bytes: int = 0
    kept_bytes: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)

    @property
    def ratio(self) -> Optional[float]:
        """``full_bytes / saved_bytes`` of the compressed tensors (None if none)."""
        return self.full_bytes / self.saved_bytes if self.saved_bytes else None


@dataclasses.dataclass
class _Entry:
    """A compressed saved tensor, for later saves of the same values."""

    owner: weakref.ref  # the tensor owning the storage (the base of a view): alive, no reuse
    version: int
    shape: torch.Size
    stored: weakref.ref


@dataclasses.dataclass
class _Reshaped:
    """A compressed contiguous tensor, saved again under another shape (e.g. a softmax output
    and its (B * heads, L, L) view read by the next matmul)."""

    stored: Stored
    shape: torch.Size


def _key(t: torch.Tensor) -> Tuple[Any, ...]:
    """What identifies the values of ``t`` while its storage lives: a contiguous tensor by the
    memory it spans (every shape viewing it holds the same values in the same order), any other
    by its full geometry."""
    geometry = (t.numel(),) if t.is_contiguous() else (tuple(t.shape), t.stride())
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, t.device) + geometry


def _unpack(packed: Union[torch.Tensor, Stored, _Reshaped]) -> torch.Tensor:
    """The saved tensor (dequantized) from what :meth:`compress_saved_tensors._pack` returned."""
    if isinstance(packed, _Reshaped):
        return load(packed.stored).view(packed.shape)
    return load(packed)


def _parameter_storages(model: Optional[nn.Module]) -> Set[int]:
    """Storage addresses of ``model``'s parameters and buffers."""
    if model is None:
        return set()
    return {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(),
                                                                    model.buffers())}


def _is_parameter(t: torch.Tensor, storages: Set[int]) -> bool:
    """Whether ``t`` is a parameter or buffer, a view of one, or an autocast copy of one."""
    owner = t if t._base is None else t._base
    if isinstance(owner, nn.Parameter) or t.untyped_storage().data_ptr() in storages:
        return True
    node = owner.grad_fn  # a dtype cast (autocast) of a parameter that trains?
    if node is None or not type(node).__name__.startswith('ToCopyBackward'):
        return False
    leaf = getattr(node.next_functions[0][0], 'variable', None)  # AccumulateGrad's tensor
    return leaf is not None and _is_parameter(leaf, storages)


def _skip_reason(t: torch.Tensor, storages: Set[int], min_bytes: int) -> Optional[str]:
    """Why saved tensor ``t`` stays in full precision ('parameter', 'type', 'shape', 'small'),
    or None to compress it."""
    if t.layout != torch.strided:
        return 'type'
    if _is_parameter(t, storages):
        return 'parameter'
    if t.dtype not in FLOAT_DTYPES:
        return 'type'
    if t.dim() < 2:
        return 'shape'
    if t.nbytes < min_bytes:
        return 'small'
    return None


class compress_saved_tensors:  # noqa: N801 (a context manager, like torch's saved_tensors_hooks)
    """Context manager compressing the tensors autograd saves for backward (see the module doc).

    One object may be entered again for each training step; each entry resets :attr:`stats`.

    Args:
        model: the model trained (or None): its parameters and buffers, under any name or view,
            are never compressed. Without it, parameters are recognised by type only.
        bits: bits per value (1, 2, 4 or 8); None uses ``config.bits`` at each save.
        min_bytes: tensors smaller than this stay in full precision.

    Attributes:
        stats: :class:`GenericStats` since the last entry.
    """

    def __init__(self, model: Optional[nn.Module] = None, bits: Optional[int] = None,
                 min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        if bits is not None and (isinstance(bits, bool) or bits not in SUPPORTED_BITS):
            raise ValueError(f'actnn_mm.compress_saved_tensors: bits must be one of '
                             f'{SUPPORTED_BITS} or None, got {bits!r}')
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f'actnn_mm.compress_saved_tensors: min_bytes must be a '
                             f'non-negative int, got {min_bytes!r}')
        self.model, self.bits, self.min_bytes = model, bits, min_bytes
        self.stats = GenericStats()
        self._storages: Set[int] = set()
        self._shared: Dict[Tuple[Any, ...], _Entry] = {}
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self._norm_hooks: List[Any] = []
        self._norm_depth = 0  # > 0 while a plain normalization module of the model runs

    def __enter__(self) -> 'compress_saved_tensors':
        if self._hooks is not None:
            raise RuntimeError('actnn_mm.compress_saved_tensors: this context is already active')
        self.stats = GenericStats()
        self._storages = _parameter_storages(self.model)
        for module in self.model.modules() if self.model is not None else ():
            if isinstance(module, _NORMS) and not isinstance(module, QLayer):
                self._norm_hooks += [module.register_forward_pre_hook(self._enter_norm),
                                     module.register_forward_hook(self._leave_norm,
                                                                  always_call=True)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        _active_hooks.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        hooks, self._hooks = self._hooks, None
        self._shared.clear()
        for handle in self._norm_hooks:
            handle.remove()
        self._norm_hooks, self._norm_depth = [], 0
        hooks.__exit__(*exc_info)
        _active_hooks.remove(self)

    def _enter_norm(self, *_: Any) -> None:
        self._norm_depth += 1

    def _leave_norm(self, *_: Any) -> None:
        self._norm_depth -= 1

    def _pack(self, t: torch.Tensor) -> Union[torch.Tensor, Stored, _Reshaped]:
        step_boundary()
        reason = 'norm' if self._norm_depth else _skip_reason(t, self._storages, self.min_bytes)
        if reason == 'norm' and _is_parameter(t, self._storages):
            reason = 'parameter'
        if reason is not None:
            if reason != 'parameter':
                self.stats.kept_bytes[reason] += t.nbytes
                step_log.record_uncompressed(reason, t.nbytes)
            return t
        key = _key(t)
        entry = self._shared.get(key)
        if entry is not None and entry.owner() is not None and entry.version == t._version:
            stored = entry.stored()
            if stored is not None:
                self.stats.shared += 1
                return stored if entry.shape == t.shape else _Reshaped(stored, t.shape)
        compressed = quantize(t, self.bits or config.bits, config.group_size,
                              stochastic=config.stochastic)
        self.stats.compressed += 1
        self.stats.saved_bytes += compressed.nbytes
        self.stats.full_bytes += t.nbytes
        step_log.record_generic(compressed.nbytes, t.nbytes, compressed.bits.tolist(),
                                t.numel() // max(compressed.bits.numel(), 1))
        if config.swap and t.device.type == 'cuda':  # a pinned CPU copy, back in `load`
            stored: Stored = Offloaded(compressed.to('cpu', non_blocking=True), t.device)
        else:
            stored = compressed
        owner = weakref.ref(t if t._base is None else t._base, functools.partial(self._forget, key))
        self._shared[key] = _Entry(owner, t._version, t.shape, weakref.ref(stored))
        return stored

    def _forget(self, key: Tuple[Any, ...], owner: weakref.ref) -> None:
        """Drop the entry of a storage owner that died (its memory may be reused)."""
        entry = self._shared.get(key)
        if entry is not None and entry.owner is owner:
            del self._shared[key]


@dataclasses.dataclass
class UncompressedActivations:
    """Full-precision activations autograd keeps for one module's forward.

    Attributes:
        module: qualified name of the module ('' for the root).
        type: its class name.
        nbytes: bytes of the distinct floating tensors saved while it was the innermost module
            running.
        tensors: their number.
    """

    module: str
    type: str
    nbytes: int
    tensors: int


class _SavedByModule:
    """Counts the floating tensors autograd saves while active, parameters excluded, each once,
    for the innermost module of ``model`` running when it is saved (a context manager)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.storages = _parameter_storages(model)
        self.stack: List[str] = []
        self.totals: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
        self.seen: Set[Tuple[Any, ...]] = set()
        self.handles: List[Any] = []
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.is_floating_point() and \
                not _is_parameter(t, self.storages):
            key = _key(t)
            if key not in self.seen:
                self.seen.add(key)
                total = self.totals[self.stack[-1] if self.stack else '']
                total[0] += t.nbytes
                total[1] += 1
        return t

    def _enter(self, name: str, *_: Any) -> None:
        self.stack.append(name)

    def _leave(self, *_: Any) -> None:
        self.stack.pop()

    def __enter__(self) -> '_SavedByModule':
        for name, module in self.model.named_modules():
            if module is not self.model:  # an empty stack stands for the root ('')
                self.handles.append(module.register_forward_pre_hook(
                    functools.partial(self._enter, name)))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))
        self.hooks.__enter__()
        _active_hooks.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.hooks.__exit__(*exc_info)
        _active_hooks.remove(self)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def report(self, min_bytes: int) -> List[UncompressedActivations]:
        """The modules that kept at least ``min_bytes``, largest first; logged."""
        types = {name: type(module).__name__ for name, module in self.model.named_modules()}
        report = sorted((UncompressedActivations(name, types[name], nbytes, count)
                         for name, (nbytes, count) in self.totals.items() if nbytes >= min_bytes),
                        key=lambda r: -r.nbytes)
        everything = sum(nbytes for nbytes, _ in self.totals.values())
        if report:
            logger.warning('actnn_mm: modules keeping full-precision activations for backward '
                           '(%.2f MiB in all):\n%s', everything / 2**20, '\n'.join(
                               f'  {r.module or "<root>"} ({r.type}): {r.nbytes / 2**20:.2f} MiB '
                               f'in {r.tensors} tensors' for r in report))
        else:
            logger.info('actnn_mm: no module keeps %.2f MiB or more of full-precision '
                        'activations (%.2f MiB in all)', min_bytes / 2**20, everything / 2**20)
        return report


def report_uncompressed(model: nn.Module, *inputs: Any, min_bytes: int = REPORT_MIN_BYTES,
                        **kwargs: Any) -> List[UncompressedActivations]:
    """Modules whose forward makes autograd keep large full-precision activations; logged.

    Runs ``model(*inputs, **kwargs)`` once with autograd recording (in the model's current
    train/eval mode, without backward) and counts the floating tensors that autograd saves,
    parameters excluded, each once, for the innermost module running when it is saved. ActNN
    layers keep their compressed activations outside autograd, so after :func:`actnn_mm.QModule`
    this shows what stays in full precision: layers without an ActNN version (or skipped at this
    level) and functional ops (attention, softmax, ...), i.e. what generic mode would compress.
    The model's buffers and the random number generators are restored afterwards.

    Args:
        model: the model (converted or not).
        *inputs: positional inputs of one forward call.
        min_bytes: report modules keeping at least this many bytes.
        **kwargs: keyword inputs of the forward call.

    Returns:
        The modules keeping at least ``min_bytes``, largest first.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = sorted({t.device.index for t in itertools.chain(model.parameters(), model.buffers())
                      if t.device.type == 'cuda'})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                _SavedByModule(model) as counter:
            model(*inputs, **kwargs)
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), buffers):
                buffer.copy_(value)
    return counter.report(min_bytes)


def report_first_step(model: nn.Module, min_bytes: int = REPORT_MIN_BYTES) -> None:
    """Log :func:`report_uncompressed`'s report for the first training forward of ``model``.

    No extra forward pass: the next forward call of ``model`` in training mode with gradients
    enabled is observed, then the observer removes itself. Under generic mode nothing is
    reported (it compresses what it can and counts the rest in :func:`actnn_mm.stats`). The
    observer's saved-tensor hooks are the innermost during that forward, so other saved-tensor
    hooks entered around it do not see its saves.

    Args:
        model: the model (or a DDP wrapper of it).
        min_bytes: report modules keeping at least this many bytes.
    """
    observing: List[Optional[_SavedByModule]] = []  # filled by the observed forward call

    def start(module: nn.Module, args: Any) -> None:
        if not observing and module.training and torch.is_grad_enabled():
            observing.append(None if _active_hooks else _SavedByModule(model).__enter__())

    def finish(module: nn.Module, args: Any, output: Any) -> None:
        if observing:
            start_handle.remove()
            finish_handle.remove()
            counter = observing[0]
            if counter is not None:
                counter.__exit__(None, None, None)
                counter.report(min_bytes)

    start_handle = model.register_forward_pre_hook(start)
    finish_handle = model.register_forward_hook(finish, always_call=True)
