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
* 'rows': tensors with fewer than :data:`MIN_ROW_VALUES` values per index of dim 0, whose
  compressed copy would barely shrink or even grow (per-anchor targets of a few columns); and
  outside loss modules, tensors that do not require grad with fewer than ``min_row_numel``
  values per index of dim 0 (16384 by default): statistics rather than activations (the fused
  attention's per-row log-sum-exp, ``F.layer_norm``'s mean and rstd), which backward may read
  nonlinearly (see :data:`DEFAULT_MIN_ROW_NUMEL`).

Two kinds of saved tensors are compressed otherwise, because their backward is nonlinear in
them and 2-bit rounding would bias the gradient:

* the output of ``F.relu`` / ``torch.relu``, saved by the relu itself (its backward reads only
  where it is positive; rounding sends small positive values to 0 and drops their gradient):
  kept as an exact 1-bit mask, like :class:`~actnn_mm.QReLU`'s;
* what a loss module of ``model`` (a subclass of torch's ``_Loss``, or a class named '...Loss'
  as OpenMMLab's CrossEntropyLoss, FocalLoss, L1Loss) saves that requires grad: backward
  exponentiates a cross-entropy's saved log-probabilities and takes the sign of an L1 loss's
  saved differences: quantized at 8 bits (:data:`LOSS_BITS`), not the configured bits (targets
  and weights, read linearly, take the configured bits). Functional losses called outside such
  modules are not detected.

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
from torch.nn.modules.loss import _Loss

from .allocate import allocate_samples, mean_square_range, value_budget
from .compress import FLOAT_DTYPES, SUPPORTED_BITS, CompressedTensor, quantize
from .compress.codec import checks_at_once, not_finite
from .config import config
from .layers.base import QLayer
from .layers.packed import PackedInts, positive_mask, unpack_ints
from .layers.saved import Held, load, offloaded
from .layers.state import ModelState, model_state

logger = logging.getLogger('actnn_mm')

DEFAULT_MIN_BYTES = 64 * 1024
# Outside loss modules, tensors saved without requires_grad and with fewer values than this per
# row (per index of dim 0, the codec's sample axis) stay exact ('rows'): statistics, not
# activations, e.g. the fused CPU attention's log-sum-exp ((B, heads, L): 2364 values a row for
# ViT-B/16 at 224 px, 6924 at 384 px), F.layer_norm's mean and rstd. Backward may read them
# nonlinearly (attention scales each probability by e^-error of its row's log-sum-exp: rounding
# that alone to 2 bits puts q's gradient 11% off). Tensors that require grad are compressed
# however short their rows: tokens ((B * L, C) in nn.MultiheadAttention) and heads folded into
# dim 0 (Swin's windows) are activations; so are a loss's targets and weights (per anchor or
# pixel, often large), which its backward reads linearly.
DEFAULT_MIN_ROW_NUMEL = 16384
# Rows shorter than this stay exact ('rows') in any case: each group of config.group_size values
# keeps two 1-byte codes, each row 17 bytes more (its min and range, width and offset), so a row
# of n float32 values takes n / 4 + 2 * ceil(n / 256) + 17 bytes at 2 bits: 23 instead of 64 at
# n = 16, and an (anchors, 1) tensor would grow 5-fold.
MIN_ROW_VALUES = 16
LOSS_BITS = 8  # for tensors saved inside loss modules (module doc)
# Normalization modules (and their subclasses, e.g. mmpretrain's LayerNorm2d): 'norm'.
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
            'small', 'rows', 'norm', 'loss'; see the module doc), counted at each save.
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
class _Mask:
    """A relu output saved for the relu's backward, which reads only where it is positive:
    kept as a 1-bit mask and restored as 0/1 values of its dtype (exact for that backward)."""

    packed: PackedInts
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.data.nbytes


@dataclasses.dataclass
class _Reshaped:
    """A compressed contiguous tensor, saved again under another shape (e.g. a softmax output
    and its (B * heads, L, L) view read by the next matmul)."""

    stored: Held
    shape: torch.Size


def _key(t: torch.Tensor) -> Tuple[Any, ...]:
    """What identifies the values of ``t`` while its storage lives: a contiguous tensor by the
    memory it spans (every shape viewing it holds the same values in the same order), any other
    by its full geometry."""
    geometry = (t.numel(),) if t.is_contiguous() else (tuple(t.shape), t.stride())
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, t.device) + geometry


def _unpack(packed: Union[torch.Tensor, Held, _Reshaped, _Mask]) -> torch.Tensor:
    """The saved tensor (dequantized) from what :meth:`compress_saved_tensors._pack` returned."""
    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, _Reshaped):
        return load(packed.stored).view(packed.shape)
    if isinstance(packed, _Mask):
        return unpack_ints(packed.packed).to(packed.dtype)
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


def _module_reason(module: nn.Module) -> Optional[str]:
    """'norm' if everything saved inside ``module`` stays in full precision, 'loss' if it is
    quantized at :data:`LOSS_BITS` (module doc), else None."""
    if isinstance(module, QLayer):
        return None
    if isinstance(module, _NORMS):
        return 'norm'
    # OpenMMLab's losses are plain modules named '...Loss' (CrossEntropyLoss, FocalLoss, ...)
    if isinstance(module, _Loss) or type(module).__name__.endswith('Loss'):
        return 'loss'
    return None


def _skip_reason(t: torch.Tensor, storages: Set[int], min_bytes: int,
                 min_row_numel: int) -> Optional[str]:
    """Why saved tensor ``t`` stays in full precision ('parameter', 'type', 'shape', 'small',
    'rows'), or None to compress it; ``min_row_numel`` is 0 inside loss modules."""
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
    row = t.numel() // t.shape[0]
    if row < MIN_ROW_VALUES or (not t.requires_grad and row < min_row_numel):
        return 'rows'
    return None


class compress_saved_tensors:  # noqa: N801 (a context manager, like torch's saved_tensors_hooks)
    """Context manager compressing the tensors autograd saves for backward (see the module doc).

    One object may be entered again for each training step; each entry resets :attr:`stats`.

    Args:
        model: the model trained (or None): its parameters and buffers, under any name or view,
            are never compressed. Without it, parameters are recognised by type only.
        bits: bits per value (1, 2, 4 or 8); None uses ``config.bits`` at each save (at L3-L5
            an average budget, group statistics included, spread over each tensor's samples by
            their ranges).
        min_bytes: tensors smaller than this stay in full precision.
        min_row_numel: tensors that do not require grad with fewer values than this per index
            of dim 0 stay in full precision.

    Attributes:
        stats: :class:`GenericStats` since the last entry.
    """

    def __init__(self, model: Optional[nn.Module] = None, bits: Optional[int] = None,
                 min_bytes: int = DEFAULT_MIN_BYTES,
                 min_row_numel: int = DEFAULT_MIN_ROW_NUMEL) -> None:
        if bits is not None and (isinstance(bits, bool) or bits not in SUPPORTED_BITS):
            raise ValueError(f'actnn_mm.compress_saved_tensors: bits must be one of '
                             f'{SUPPORTED_BITS} or None, got {bits!r}')
        for name, value in (('min_bytes', min_bytes), ('min_row_numel', min_row_numel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'actnn_mm.compress_saved_tensors: {name} must be a '
                                 f'non-negative int, got {value!r}')
        self.model, self.bits = model, bits
        self.min_bytes, self.min_row_numel = min_bytes, min_row_numel
        self.stats = GenericStats()
        self._storages: Set[int] = set()
        self._shared: Dict[Tuple[Any, ...], _Entry] = {}
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self._module_hooks: List[Any] = []
        self._module_reasons: List[str] = []  # of the norm and loss modules running, innermost last

    def __enter__(self) -> 'compress_saved_tensors':
        if self._hooks is not None:
            raise RuntimeError('actnn_mm.compress_saved_tensors: this context is already active')
        self.stats = GenericStats()
        self._storages = _parameter_storages(self.model)
        self._state = ModelState() if self.model is None else model_state(self.model)
        for module in self.model.modules() if self.model is not None else ():
            reason = _module_reason(module)
            if reason is not None:
                self._module_hooks += [
                    module.register_forward_pre_hook(functools.partial(self._enter, reason)),
                    module.register_forward_hook(self._leave, always_call=True)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        _active_hooks.append(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        hooks, self._hooks = self._hooks, None
        self._shared.clear()
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks, self._module_reasons = [], []
        hooks.__exit__(*exc_info)
        _active_hooks.remove(self)

    def _enter(self, reason: str, *_: Any) -> None:
        self._module_reasons.append(reason)

    def _leave(self, *_: Any) -> None:
        self._module_reasons.pop()

    def _pack(self, t: torch.Tensor) -> Union[torch.Tensor, Held, _Reshaped, _Mask]:
        step_log = self._state.step_log
        self._state.step_boundary()
        module = self._module_reasons[-1] if self._module_reasons else None
        if module == 'norm':  # parameters are still not counted
            reason = 'parameter' if _is_parameter(t, self._storages) else module
        else:
            reason = _skip_reason(t, self._storages, self.min_bytes,
                                  0 if module == 'loss' else self.min_row_numel)
        if reason is not None:
            if reason != 'parameter':
                self.stats.kept_bytes[reason] += t.nbytes
                step_log.record_uncompressed(reason, t.nbytes)
            return t
        loss_grad = module == 'loss' and t.requires_grad
        bits = LOSS_BITS if loss_grad else self.bits or config.bits
        key = _key(t) + (bits,)
        if t.grad_fn is not None and t.grad_fn.name() == 'ReluBackward0' \
                and key + ('relu',) not in self._shared:  # the relu's own save comes first
            return self._keep(key + ('relu',), t, _Mask(positive_mask(t), t.dtype),
                              budgeted=False)
        entry = self._shared.get(key)
        if entry is not None and entry.owner() is not None and entry.version == t._version:
            stored = entry.stored()
            if stored is not None:
                self.stats.shared += 1
                return stored if entry.shape == t.shape else _Reshaped(stored, t.shape)
        widths, budget = bits, None
        if config.adaptive and not loss_grad and not self.bits:
            # L3-L5: the budget, less the group statistics, spread over the samples
            budget = value_budget(bits, config.group_size,
                                  t.numel() // max(t.shape[0] if t.dim() else 1, 1))
            widths = allocate_samples(mean_square_range(t, config.group_size), budget)
        compressed = quantize(t, widths, config.group_size, stochastic=config.stochastic,
                              budget=budget, defer_check=True)
        if not checks_at_once(t.device):  # quantize left the NaN/Inf check to us
            step_log.watch(not_finite(compressed), 'a tensor saved under generic mode')
        return self._keep(key, t, offloaded(compressed, self._state), not loss_grad, compressed)

    def _keep(self, key: Tuple[Any, ...], t: torch.Tensor, stored: Union[Held, '_Mask'],
              budgeted: bool, compressed: Optional[Union[CompressedTensor, '_Mask']] = None
              ) -> Union[Held, '_Mask']:
        """Count ``stored`` (``compressed`` if given: what ``stored`` holds) as the saved copy
        of ``t`` and remember it under ``key`` for later saves of the same values. Only a copy
        at the configured bits (``budgeted``) enters the bit statistics: masks and 8-bit loss
        tensors count in bytes, as the layers' masks do."""
        if compressed is None:
            compressed = stored
        widths = compressed.bits if budgeted else None
        self.stats.compressed += 1
        self.stats.saved_bytes += compressed.nbytes
        self.stats.full_bytes += t.nbytes
        self._state.step_log.record_generic(
            compressed.nbytes, t.nbytes, widths, t.numel() // max(t.shape[0] if t.dim() else 1, 1),
            compressed.statistics_nbytes if budgeted else 0)
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
