"""Adaptive mixed precision (ActNN's L3): bits per sample and per layer under an average budget.

Quantizing layer ``l``'s saved activation for sample ``n`` to ``b`` bits adds noise of variance
about ``range^2 / (2^b - 1)^2`` per value (times a constant all layers share). The allocator
models how much gradient variance that noise causes, ``C[l, n] / (2^b - 1)^2``, for two kinds of
layers:

* **weight** layers (convolutions, linear layers), whose saved input only enters their weight
  gradient (``grad_W = sum grad_out x^T``)::

      C[l, n] = |grad of the layer's output for n|^2 * fan_in * mean over groups of range^2

  (``fan_in`` = weights per output channel: each output gradient meets that many input values);
* **norm** layers (BatchNorm), which keep their normalized input ``xh``. Its noise enters their
  weight gradient ``dw = sum grad_out xh`` (as above with ``fan_in`` 1) and, far more, every
  earlier layer through the input gradient ``w s (grad_out - mean(grad_out) - xh dw / M)``
  (``s`` the inverse std, ``M`` values per channel): the noise of ``dw`` rides on ``xh``, whose
  image in the weight gradient of the convolution that made the layer's input is
  ``u = sum over positions of xh x^T`` (``x`` that convolution's input). Per channel this adds
  ``(w s |u| / M)^2 * sum grad_out^2 * noise``, so::

      C[l, n] = |grad of the layer's output for n|^2 * mean over groups of range^2 * (1 + K)
      K = mean over channels of (w s |u| / M)^2

  ``K`` (10-100 in a ResNet: a convolution's inputs are correlated, so ``u`` adds up
  coherently) is measured every ``probe_every`` steps on a few samples: the convolution offers
  a function computing ``u`` from ``xh`` (:meth:`Allocator.offer_probe`), which the batch norm
  it feeds takes (:meth:`Allocator.take_probe`). docs/compression.md compares these predictions
  with measured variances.

Other layers (GELU, GroupNorm, LayerNorm, ...) keep the budget as their average and only share it
among their samples. Batch norms with fewer than ``NORM_TWO_BITS_BELOW`` values per channel get
their samples' second bit before any other upgrade (why: :meth:`Allocator.bits_for`). The
allocator chooses ``b`` in {1, 2, 4, 8} to minimise the summed variance while the element-weighted
average, group statistics included (:func:`value_budget`), stays at or below the budget
(``config.activation_compression_bits[0]``):

* at forward time, per layer: the samples of the batch share the layer's budget (ranges are
  measured then; gradient magnitudes and gains come from earlier steps);
* after each backward pass, across layers: each layer's share of the budget is set from the
  sensitivities of the step just done.

Both solve the same problem with :func:`allocate`. Gradient magnitudes are a running average per
dataset index when the loader tells which samples are in the batch
(:func:`actnn_mm.set_sample_indices`), else a running average of the batch's mean per layer.
Each converted model has its own :class:`Allocator` (:mod:`actnn_mm.layers.state`).
"""
import dataclasses
import math
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .compress import ops
from .compress.codec import FLOAT_DTYPES, samples_view, statistics_bits
from .config import config
from .host import HostCopy

BITS = (1, 2, 4, 8)
# Kinds of layer (see the module docstring): their share of the budget is re-balanced across
# layers; any other kind keeps the average.
WEIGHT, NORM = 'weight', 'norm'
# Samples a probe of a NORM layer's propagation K reads (see Allocator.offer_probe)
PROBE_SAMPLES = 4
# NORM layers with fewer values per channel than this get their samples' second bit first (see
# Allocator.bits_for)
NORM_TWO_BITS_BELOW = 8192
_VARIANCE_LIST = [1.0 / (2**b - 1)**2 for b in BITS]
_VARIANCE = torch.tensor(_VARIANCE_LIST, dtype=torch.float64)


Floats = Union[torch.Tensor, Sequence[float]]


def value_budget(budget: float, group_size: int, values: Optional[int] = None) -> float:
    """The average bits per value that a budget of ``budget`` bits per value, group statistics
    included, leaves for the values of samples of ``values`` values (at least 1: samples of a
    few values can cost more)."""
    return max(1.0, budget - statistics_bits(group_size, values))


def allocate(sensitivity: Floats, cost: Floats, budget: float,
             two_bits: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """Bits in {1, 2, 4, 8} per item minimising ``sum(sensitivity / (2^bits - 1)^2)``.

    Greedy: take the upgrade with the largest variance reduction per bit spent, while the budget
    allows. Each item's successive upgrades 1->2, 2->4, 4->8 reduce the variance by ever less per
    bit, so the greedy order is one global sort of all upgrades, scanned for upgrades that fit
    (their item's previous upgrade taken). O(K log K). Many items (the split across layers) are
    sorted by torch, and the longest prefix that fits is taken at once; a few (the samples of
    one layer, at every forward call) in plain Python, which costs less than torch's per-op
    overhead.

    Args:
        sensitivity: (K,) non-negative sensitivity of each item (a tensor or a sequence).
        cost: (K,) elements of each item (a bit more for an item costs this many bits).
        budget: the largest allowed ``sum(bits * cost) / sum(cost)``; at least 1.
        two_bits: (K,) whether each item needs 2 bits: the 1->2 upgrades of those items come
            first (in item order), as far as the budget allows.

    Returns:
        (K,) int64 bits per item, on the CPU.
    """
    if budget < 1:
        raise ValueError(f'actnn_mm: the average bit budget must be at least 1, got {budget}')
    k = sensitivity.numel() if isinstance(sensitivity, torch.Tensor) else len(sensitivity)
    two_bits = [False] * k if two_bits is None else [bool(t) for t in two_bits]
    if k <= _FEW_ITEMS:
        return _allocate_few(_float_list(sensitivity), _float_list(cost), budget, two_bits)
    sensitivity = torch.as_tensor(sensitivity).detach().to('cpu', torch.float64).flatten()
    cost = torch.as_tensor(cost).detach().to('cpu', torch.float64).flatten()
    widths = torch.tensor(BITS, dtype=torch.float64)
    # upgrades[s * k + i]: item i from BITS[s] to BITS[s + 1]; listed stage by stage so that a
    # stable sort keeps an item's upgrades in order when their ratios tie (zero sensitivity).
    gain = sensitivity[None, :] * (_VARIANCE[:-1] - _VARIANCE[1:])[:, None]
    spend = (cost[None, :] * (widths[1:] - widths[:-1])[:, None]).flatten()
    ratio = (gain.flatten() / spend.clamp_min(1e-300)).where(spend > 0, 0.0)
    ratio[:k][torch.tensor(two_bits, dtype=torch.bool)] = math.inf
    order = torch.sort(ratio, descending=True, stable=True).indices
    left = (budget - 1.0) * float(cost.sum()) * (1 + 1e-12)
    spent = torch.cumsum(spend[order], dim=0)
    prefix = int((spent <= left).sum())
    stage = torch.zeros(k, dtype=torch.int64)
    if prefix:
        stage += torch.bincount(order[:prefix] % k, minlength=k)
        left -= float(spent[prefix - 1])
    rest = order[prefix:]
    rest = rest[spend[rest] <= left]  # what could still fit at all
    return _take_upgrades(rest.tolist(), spend.tolist(), stage.tolist(), left)


# Up to this many items, allocate() sorts in plain Python (faster than torch up to about 100).
_FEW_ITEMS = 64


def _float_list(values: Floats) -> List[float]:
    if isinstance(values, torch.Tensor):
        return values.detach().to('cpu', torch.float64).flatten().tolist()
    return [float(v) for v in values]


def _allocate_few(sensitivity: List[float], cost: List[float], budget: float,
                  two_bits: List[bool]) -> torch.Tensor:
    """:func:`allocate` of a few items, in plain Python: the same order (a stable sort of the
    upgrades listed stage by stage), the same scan."""
    k = len(sensitivity)
    ratio, spend = [], []
    for stage in range(len(BITS) - 1):
        gain = _VARIANCE_LIST[stage] - _VARIANCE_LIST[stage + 1]
        width = BITS[stage + 1] - BITS[stage]
        for s, c in zip(sensitivity, cost):
            spend.append(c * width)
            ratio.append(s * gain / spend[-1] if spend[-1] > 0 else 0.0)
    for item in range(k):
        if two_bits[item]:
            ratio[item] = math.inf
    order = sorted(range(len(ratio)), key=ratio.__getitem__, reverse=True)  # stable
    left = (budget - 1.0) * sum(cost) * (1 + 1e-12)
    return _take_upgrades(order, spend, [0] * k, left)


def _take_upgrades(order: List[int], spend: List[float], stage: List[int],
                   left: float) -> torch.Tensor:
    """Bits per item after taking, in ``order``, each upgrade (``stage * K + item``) that is its
    item's next and costs at most what is ``left``; ``stage`` holds the upgrades taken so far."""
    k = len(stage)
    for upgrade in order:
        item, step = upgrade % k, upgrade // k
        if stage[item] == step and spend[upgrade] <= left:
            stage[item] += 1
            left -= spend[upgrade]
    return torch.tensor([BITS[s] for s in stage], dtype=torch.int64)


def allocate_samples(sensitivity: torch.Tensor, budget: float,
                     two_bits: bool = False) -> torch.Tensor:
    """:func:`allocate` of items of equal cost (the samples of one layer), on their device.

    Args:
        sensitivity: (K,) non-negative sensitivity of each item, on any device.
        budget: the largest allowed mean of the bits; at least 1.
        two_bits: whether the items need 2 bits (see :func:`allocate`).

    Returns:
        (K,) uint8 bits per item on ``sensitivity``'s device, read from it only on the CPU
        (where :func:`allocate`'s scan is 10x faster for the few samples of a batch than the
        some 30 small tensor ops of :func:`_prefix_passes`).
    """
    k = sensitivity.numel()
    if sensitivity.device.type == 'cpu':
        return allocate(sensitivity, [1.0] * k, budget, [two_bits] * k).to(torch.uint8)
    return _prefix_passes(sensitivity, budget, two_bits)


def _prefix_passes(sensitivity: torch.Tensor, budget: float,
                   two_bits: bool = False) -> torch.Tensor:
    """:func:`allocate_samples` in tensor ops only, reading nothing from the device.

    With every item's upgrades costing 1, 2 and 4 units, the greedy scan takes the longest prefix
    of the sorted upgrades that fits; after the first that does not (costing ``w``), only cheaper
    upgrades can still fit, and the scan goes on with those. So at most three prefix passes (one
    per cost) give exactly :func:`allocate`'s bits.
    """
    if budget < 1:
        raise ValueError(f'actnn_mm: the average bit budget must be at least 1, got {budget}')
    device, k = sensitivity.device, sensitivity.numel()
    if not k:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    # BITS and _VARIANCE made on the device (a tensor copied from the host could wait for it)
    widths = torch.pow(2.0, torch.arange(len(BITS), dtype=torch.float64, device=device))
    variance = 1.0 / (torch.pow(2.0, widths) - 1) ** 2
    gain = variance[:-1] - variance[1:]
    cost = (widths[1:] - widths[:-1])[:, None].expand(-1, k).flatten()
    ratio = (sensitivity.to(torch.float64).flatten()[None, :] * gain[:, None]).flatten() / cost
    if two_bits:
        ratio[:k] = math.inf
    order = torch.sort(ratio, descending=True, stable=True).indices
    cost = cost[order]
    position = torch.arange(cost.numel(), device=device)
    taken = torch.zeros_like(cost, dtype=torch.bool)
    left = torch.full((), (budget - 1.0) * k * (1 + 1e-12), dtype=torch.float64, device=device)
    limit = torch.full((), math.inf, dtype=torch.float64, device=device)
    start = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(len(BITS) - 1):
        candidate = (position >= start) & (cost < limit)
        fits = candidate & (torch.cumsum(cost * candidate, 0) <= left)
        taken |= fits
        left = left - (cost * fits).sum()
        missed = candidate & ~fits
        first = missed.byte().argmax(0, keepdim=True)  # 0 if none missed: then none is left
        # (indexing with a tensor would read it on the host)
        limit = torch.where(missed.any(), cost.index_select(0, first)[0], 0.0)
        start = first[0] + 1
    stage = torch.zeros_like(taken).index_put_((order,), taken).view(len(BITS) - 1, k).sum(0)
    return (1 << stage).to(torch.uint8)


# The allocator only needs per-sample means, which evenly spread subsets estimate well; reading
# at most this many groups (ranges) or values (gradients, in blocks of contiguous values, which
# reductions read 20x faster than a strided subset) per sample keeps its cost small.
_RANGE_GROUPS = 64
_GRAD_VALUES = 16384
_GRAD_BLOCKS = 16


def _samples(x: torch.Tensor) -> torch.Tensor:
    """(N, M) view of ``x`` in memory order, in a dtype the statistics ops take."""
    samples, _ = samples_view(x.detach())
    return samples if samples.dtype in FLOAT_DTYPES else samples.float()


def mean_square_range(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per sample of ``x`` (dim 0), the mean over its groups of the squared group range: the
    scale of its quantization noise per value. Groups follow the codec's memory order; a sample
    of many groups is estimated from ``_RANGE_GROUPS`` groups spread evenly over it."""
    return ops.mean_square_range(_samples(x), group_size, _RANGE_GROUPS)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per sample of ``x`` (dim 0), the sum of squares, estimated from ``_GRAD_VALUES`` values
    in ``_GRAD_BLOCKS`` blocks spread evenly over it."""
    return ops.sum_of_squares(_samples(x), _GRAD_VALUES, _GRAD_BLOCKS)


def fan_in(module: torch.nn.Module) -> int:
    """Weights per output channel of a convolution or linear layer: the input values each
    output gradient meets. A transposed convolution's weight is (in, out / groups, *kernel)."""
    shape = module.weight.shape
    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        return shape[0] // module.groups * math.prod(shape[2:])
    return math.prod(shape[1:])


@dataclasses.dataclass
class _LayerState:
    """What the allocator knows of one layer (tensors on the layer's device)."""

    kind: Optional[str] = WEIGHT       # WEIGHT, NORM or None (keeps the average budget)
    budget: Optional[float] = None     # its share of the average bits (None: not set yet)
    # running mean over samples of |grad of its output|^2 (None: not observed, see observe_grad)
    grad_sq: Optional[torch.Tensor] = None
    # NORM: running mean of K, how much more its noise reaches earlier layers than its own
    # weight gradient (None: not measured yet, see observe_propagation)
    propagation: Optional[torch.Tensor] = None
    two_bits: bool = False  # whether its samples need 2 bits (see bits_for)
    # this step: (per-sample range term, elements per sample) of each call (a head shared across
    # feature levels is called several times per step)
    calls: List[Tuple[torch.Tensor, int]] = dataclasses.field(default_factory=list)
    # this step: per-sample |grad|^2 relative to the batch mean, summed over backward calls
    relative_grad: Optional[torch.Tensor] = None


# (layer, samples, elements per sample) of each call whose sensitivities a re-balance reads
_Items = List[Tuple[_LayerState, int, int]]


class Allocator:
    """Per-sample and per-layer bit allocation (see the module docstring).

    Nothing in a step reads the device: per-sample statistics and bits stay there; the
    re-balance across layers reads the sensitivities of a step on the host once they have
    arrived (:class:`actnn_mm.host.HostCopy`): at the next step on the CPU, usually one step
    later on a GPU.

    Args:
        momentum: weight of the past in the running means of each layer's gradient magnitude
            and propagation ``K``.
        probe_every: steps between measurements of ``K`` (the first step measures).
    """

    def __init__(self, momentum: float = 0.9, probe_every: int = 10) -> None:
        if probe_every < 1:
            raise ValueError(f'actnn_mm: probe_every must be at least 1, got {probe_every}')
        self.momentum = momentum
        self.probe_every = probe_every
        self.probing = True  # whether this step measures K
        self._steps = 0
        self._probe: Optional[Tuple[weakref.ref, Callable[[torch.Tensor], torch.Tensor]]] = None
        # by module, weakly: a new model must not inherit a dead one's state through a reused id
        self.layers: 'weakref.WeakKeyDictionary[torch.nn.Module, _LayerState]' = \
            weakref.WeakKeyDictionary()
        self.sample_indices: Optional[torch.Tensor] = None
        # per dataset index: its gradient magnitude relative to its batch, and whether known
        # (on the device of the layers' statistics)
        self.sample_scale: Optional[torch.Tensor] = None
        self.sample_seen: Optional[torch.Tensor] = None
        self._step_indices: Optional[torch.Tensor] = None
        # sensitivities of earlier steps on their way to the host, oldest first
        self._arriving: List[Tuple[HostCopy, _Items]] = []

    def reset(self) -> None:
        """Forget all layers and samples (e.g. before training another model)."""
        self.__init__(self.momentum, self.probe_every)

    def set_sample_indices(self, indices: Optional[Sequence[int]]) -> None:
        """Dataset indices of the samples of the next forward pass (None: unknown)."""
        self.sample_indices = (None if indices is None else
                               torch.as_tensor(indices, dtype=torch.int64).flatten().cpu())

    def _indices_on(self, device: torch.device) -> torch.Tensor:
        # from the host, without waiting for the device
        return self._step_indices.to(device, non_blocking=True)

    def _sample_factor(self, n: int, device: torch.device) -> Optional[torch.Tensor]:
        """Each sample's gradient magnitude relative to its batch (1 where unknown), or None if
        no sample of the batch can be known."""
        if self._step_indices is None or self._step_indices.numel() != n \
                or self.sample_scale is None:
            return None
        scale, seen = self.sample_scale.to(device), self.sample_seen.to(device)
        indices = self._indices_on(device)
        inside = indices < scale.numel()
        index = indices.clamp(max=scale.numel() - 1)
        return torch.where(inside & seen[index], scale[index], 1.0)

    def begin_step(self) -> None:
        """A training forward pass starts: learn from the step just done, re-balance layers."""
        self._learn_sample_scales()
        self._rebalance()
        self._steps += 1  # the first step (no begin_step before it) is step 0, probing
        self.probing = self._steps % self.probe_every == 0
        self._probe = None
        self._step_indices = self.sample_indices
        for state in self.layers.values():
            state.calls, state.relative_grad = [], None

    def bits_for(self, module: torch.nn.Module, x: torch.Tensor, budget: float,
                 group_size: int, kind: Optional[str]) -> Tuple[torch.Tensor, float]:
        """Per-sample bits for the activation ``x`` (dim 0 = samples) that ``module`` keeps.

        Args:
            module: the layer.
            x: its activation.
            budget: the average bits per value, group statistics included.
            group_size: the codec's group size.
            kind: WEIGHT (the layer's weight gradient is all ``x`` enters), NORM (``x`` is a
                batch norm's normalized input) or None; the first two have their share of the
                budget re-balanced against each other, others keep ``budget``.

        Returns:
            (N,) uint8 bits on ``x``'s device, and the layer's budget for the values (re-balanced,
            or ``budget`` less the statistics): the most their mean is.
        """
        if kind not in (WEIGHT, NORM, None):
            raise ValueError(f'actnn_mm: unknown kind of layer for the allocator: {kind!r}')
        state = self.layers.setdefault(module, _LayerState(kind=kind))
        n = x.shape[0] if x.dim() else 1
        if self._step_indices is None:  # indices given before the first step's forward
            self._step_indices = self.sample_indices
        ranges = mean_square_range(x, group_size)
        if kind == WEIGHT and getattr(module, 'weight', None) is not None:
            ranges = ranges * fan_in(module)
        elements = x.numel() // max(n, 1)
        state.calls.append((ranges, elements))
        # before the first split across layers: what whole groups' statistics leave
        layer_budget = value_budget(budget, group_size) if state.budget is None else state.budget
        # A batch norm's input gradient w s (g - mean(g) - xh mean(g xh)) cancels as it should
        # only with the exact xh: rounding xh leaves an error that the inverse std s scales and
        # every earlier batch norm compounds, which the model does not capture, largest where a
        # channel has few values. torchvision's resnet50 at 32 px, batch 2 (M <= 512), with one
        # sample of two at 1 bit in every layer had gradients 8e4 times FP32's (NaN the next
        # step); resnet18 on digits with 1-bit batch norms at M = 2048-4096 had 1.7-2.7x the
        # variance of uniform 2 bits at initialisation. So such layers' samples get their second
        # bit first, as far as the budget allows.
        few_values = x.dim() > 1 and x.numel() // max(x.shape[1], 1) < NORM_TWO_BITS_BELOW
        state.two_bits = kind == NORM and few_values
        bits = allocate_samples(self._sensitivity(state, ranges), layer_budget, state.two_bits)
        return bits, layer_budget

    def _running(self, mean: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
        return value if mean is None else self.momentum * mean + (1 - self.momentum) * value

    def _sensitivity(self, state: _LayerState, ranges: torch.Tensor) -> torch.Tensor:
        """Per-sample sensitivity of a call of the layer of ``state`` with range terms
        ``ranges``."""
        sensitivity = ranges if state.propagation is None else ranges * (1 + state.propagation)
        for factor in (state.grad_sq, self._sample_factor(ranges.numel(), ranges.device)):
            if factor is not None:
                sensitivity = sensitivity * factor
        return sensitivity

    def observe_grad(self, module: torch.nn.Module, grad: torch.Tensor) -> None:
        """Record the gradient flowing back into ``module``'s output (dim 0 = samples).

        Only layers re-balanced across layers are observed: the others share a fixed budget among
        their samples, a split no per-layer factor changes. The samples' relative gradient
        magnitudes are learned from the weight layers.
        """
        state = self.layers.get(module)
        if state is None or state.kind is None or grad.dim() == 0 or not grad.shape[0]:
            return
        per_sample = sum_of_squares(grad)
        mean = per_sample.mean()
        state.grad_sq = self._running(state.grad_sq, mean)
        if self._step_indices is None or state.kind != WEIGHT:
            return  # samples are only remembered by their dataset index
        relative = torch.where(mean > 0, per_sample / mean, 1.0)
        if state.relative_grad is not None and state.relative_grad.shape == relative.shape:
            relative = relative + state.relative_grad
        state.relative_grad = relative

    def offer_probe(self, source: object,
                    weight_gradient: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """On a probe step, a convolution offers the NORM layer its output may feed a function
        giving its weight gradient on the first ``PROBE_SAMPLES`` samples for an output gradient
        of those samples. ``source`` is the output's ``grad_fn``; the next offer replaces this
        one (only a layer right after the convolution takes it). ``source`` is held weakly: it
        holds the convolution's saved activation."""
        self._probe = (weakref.ref(source), weight_gradient)

    def take_probe(self, x: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The weight-gradient function offered by the convolution that made ``x``, if one did
        on this probe step; the offer is withdrawn."""
        probe, self._probe = self._probe, None
        if probe is None or x.grad_fn is None or probe[0]() is not x.grad_fn:
            return None
        return probe[1]

    def observe_propagation(self, module: torch.nn.Module, propagation: torch.Tensor) -> None:
        """Record a NORM layer's measured ``K`` (see the module docstring)."""
        state = self.layers.setdefault(module, _LayerState(kind=NORM))
        state.propagation = self._running(state.propagation, propagation.detach().float())

    def _learn_sample_scales(self) -> None:
        """Remember each sample's gradient magnitude, relative to its batch, by dataset index."""
        indices = self._step_indices
        relatives = [s.relative_grad for s in self.layers.values() if s.relative_grad is not None]
        if indices is None or not relatives or any(r.numel() != indices.numel()
                                                    for r in relatives):
            return
        scale = torch.stack([r / r.mean().clamp_min(1e-30) for r in relatives]).mean(0)
        size = int(indices.max()) + 1  # indices are host data
        if self.sample_scale is None:
            self.sample_scale = scale.new_ones(0)
            self.sample_seen = scale.new_zeros(0, dtype=torch.bool)
        if size > self.sample_scale.numel():
            grow = size - self.sample_scale.numel()
            self.sample_scale = torch.cat([self.sample_scale, scale.new_ones(grow)])
            self.sample_seen = torch.cat([self.sample_seen,
                                          scale.new_zeros(grow, dtype=torch.bool)])
        device_indices = self._indices_on(scale.device)
        self.sample_scale[device_indices] = scale.to(self.sample_scale.dtype)
        self.sample_seen[device_indices] = True

    def _rebalance(self) -> None:
        """Split the average bits across layers by the sensitivities of the latest step whose
        sensitivities have reached the host."""
        calls = [(state, ranges, elements) for state in self.layers.values()
                 if state.kind is not None for ranges, elements in state.calls if ranges.numel()]
        if calls:
            device = calls[0][1].device
            sensitivity = torch.cat([self._sensitivity(state, ranges).to(device)
                                     for state, ranges, _ in calls])
            copy = HostCopy(sensitivity)
            if copy.has_values:
                self._arriving.append((copy, [(state, ranges.numel(), elements)
                                              for state, ranges, elements in calls]))
        arrived = [i for i, (copy, _) in enumerate(self._arriving) if copy.ready()]
        if not arrived:
            return
        copy, calls = self._arriving[arrived[-1]]
        del self._arriving[:arrived[-1] + 1]  # older ones are superseded
        cost = torch.cat([torch.full((n,), float(elements)) for _, n, elements in calls])
        statistics = sum(n * elements * statistics_bits(config.group_size, elements)
                         for _, n, elements in calls) / float(cost.sum())
        two_bits = [state.two_bits for state, n, _ in calls for _ in range(n)]
        bits = allocate(copy.values(), cost, max(1.0, float(config.bits) - statistics),
                        two_bits).double()
        spent: Dict[int, List[float]] = {}
        start = 0
        for state, n, elements in calls:
            spent.setdefault(id(state), [0.0, 0.0])
            spent[id(state)][0] += float(bits[start:start + n].sum()) * elements
            spent[id(state)][1] += n * elements
            start += n
        for state, _, _ in calls:
            bits_spent, layer_elements = spent[id(state)]
            state.budget = bits_spent / layer_elements
