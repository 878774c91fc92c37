"""Adaptive mixed precision (ActNN's L3): bits per sample and per layer under an average budget.

Quantizing the activation of sample ``n`` at layer ``l`` to ``b`` bits adds a gradient variance of
about ``C[l, n] / (2^b - 1)^2``, where the sensitivity ``C[l, n]`` is the sum of the squared group
ranges of that activation (the quantization step is range / (2^b - 1)) times the squared
magnitude of the gradient flowing back into that layer for that sample. The allocator chooses
``b`` in {1, 2, 4, 8} to minimise the summed variance while the element-weighted average stays at
or below the budget (``config.activation_compression_bits[0]``):

* at forward time, per layer: the samples of the batch share the layer's budget (ranges are
  measured then; gradient magnitudes come from earlier steps);
* after each backward pass, across layers: each layer's share of the budget is set from the
  sensitivities of the step just done.

Both solve the same problem with :func:`allocate`. Gradient magnitudes are a running average per
dataset index when the loader tells which samples are in the batch
(:func:`set_sample_indices`), else a running average of the batch's mean per layer.
"""
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

BITS = (1, 2, 4, 8)
_VARIANCE = torch.tensor([1.0 / (2**b - 1)**2 for b in BITS], dtype=torch.float64)


def allocate(sensitivity: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Bits in {1, 2, 4, 8} per item minimising ``sum(sensitivity / (2^bits - 1)^2)``.

    Greedy: take the upgrade with the largest variance reduction per bit spent, while the budget
    allows. Each item's successive upgrades 1->2, 2->4, 4->8 reduce the variance by ever less per
    bit, so the greedy order is one global sort of all upgrades: the longest prefix that fits is
    taken at once (vectorised), then the rest of the order is scanned for upgrades that still fit
    (their item's previous upgrade taken). O(K log K).

    Args:
        sensitivity: (K,) non-negative sensitivity of each item.
        cost: (K,) elements of each item (a bit more for an item costs this many bits).
        budget: the largest allowed ``sum(bits * cost) / sum(cost)``; at least 1.

    Returns:
        (K,) int64 bits per item, on the CPU.
    """
    if budget < 1:
        raise ValueError(f'actnn_mm: the average bit budget must be at least 1, got {budget}')
    sensitivity = sensitivity.detach().to('cpu', torch.float64).flatten()
    cost = cost.detach().to('cpu', torch.float64).flatten()
    k = sensitivity.numel()
    widths = torch.tensor(BITS, dtype=torch.float64)
    # upgrades[s * k + i]: item i from BITS[s] to BITS[s + 1]; listed stage by stage so that a
    # stable sort keeps an item's upgrades in order when their ratios tie (zero sensitivity).
    gain = sensitivity[None, :] * (_VARIANCE[:-1] - _VARIANCE[1:])[:, None]
    spend = (cost[None, :] * (widths[1:] - widths[:-1])[:, None]).flatten()
    ratio = (gain.flatten() / spend.clamp_min(1e-300)).where(spend > 0, 0.0)
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
    stage_list, spend_list = stage.tolist(), spend.tolist()
    for upgrade in rest.tolist():
        item, step = upgrade % k, upgrade // k
        if stage_list[item] == step and spend_list[upgrade] <= left:
            stage_list[item] += 1
            left -= spend_list[upgrade]
    return torch.tensor(BITS, dtype=torch.int64)[torch.tensor(stage_list, dtype=torch.int64)]


def group_range_sq_sum(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per sample of ``x`` (dim 0), the sum over its groups of the squared group range times the
    group size: the scale of its quantization noise. Groups follow the codec's memory order."""
    from .compress.codec import _samples_view

    samples, _ = _samples_view(x.detach())
    n, m = samples.shape
    if n * m == 0:
        return torch.zeros(n, dtype=torch.float64)
    pad = (-m) % group_size
    values = samples.float()
    if pad:  # repeat the last value: the padded group's range is unchanged
        values = torch.cat([values, values[:, -1:].expand(n, pad)], dim=1)
    lo, hi = values.view(n, -1, group_size).aminmax(dim=2)
    return ((hi - lo).double().pow(2).sum(dim=1) * group_size).cpu()


@dataclasses.dataclass
class _LayerState:
    """What the allocator knows of one layer."""

    name: str
    budget: Optional[float] = None     # the layer's share of the average bits (None: not set yet)
    grad_sq: Optional[float] = None    # running mean over samples of |grad of its output|^2
    # the current step: per-sample range term, elements per sample, bits given
    ranges: Optional[torch.Tensor] = None
    elements: int = 0
    bits: Optional[torch.Tensor] = None
    # per-sample |grad|^2 relative to the batch mean, summed over the backward calls of the step
    relative_grad: Optional[torch.Tensor] = None


class Allocator:
    """Per-sample and per-layer bit allocation (see the module docstring).

    Args:
        momentum: weight of the past in the running means of gradient magnitudes.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.layers: Dict[int, _LayerState] = {}
        self.sample_indices: Optional[torch.Tensor] = None
        self.sample_scale = torch.ones(0)       # per dataset index: |grad|^2 relative to the batch
        self.sample_seen = torch.zeros(0, dtype=torch.bool)
        self._step_indices: Optional[torch.Tensor] = None
        self._in_step = False

    def reset(self) -> None:
        """Forget everything (e.g. between unrelated models)."""
        self.__init__(self.momentum)

    def set_sample_indices(self, indices: Optional[Sequence[int]]) -> None:
        """Dataset indices of the samples of the next forward pass (None: unknown)."""
        self.sample_indices = (None if indices is None else
                               torch.as_tensor(indices, dtype=torch.int64).flatten().cpu())

    def _layer(self, module: torch.nn.Module) -> _LayerState:
        state = self.layers.get(id(module))
        if state is None:
            state = self.layers[id(module)] = _LayerState(name=type(module).__name__)
        return state

    def _sample_factor(self, n: int) -> torch.Tensor:
        """Each sample's gradient magnitude relative to its batch (1 where unknown)."""
        indices = self._step_indices
        if indices is None or indices.numel() != n:
            return torch.ones(n, dtype=torch.float64)
        factor = torch.ones(n, dtype=torch.float64)
        known = indices < self.sample_seen.numel()
        known[known.clone()] = self.sample_seen[indices[known]]
        factor[known] = self.sample_scale[indices[known]].double()
        return factor

    def begin_step(self) -> None:
        """Called when a training forward pass starts: re-balance layers after the last step."""
        if self._in_step:
            self._rebalance()
        self._in_step = True
        self._step_indices = self.sample_indices
        for state in self.layers.values():
            state.ranges = state.bits = state.relative_grad = None

    def bits_for(self, module: torch.nn.Module, x: torch.Tensor, budget: float,
                 group_size: int) -> torch.Tensor:
        """Per-sample bits for activation ``x`` of ``module`` (dim 0 = samples)."""
        state = self._layer(module)
        n = x.shape[0] if x.dim() else 1
        ranges = group_range_sq_sum(x, group_size)
        sensitivity = ranges * self._sample_factor(n) * (state.grad_sq or 1.0)
        elements = x.numel() // max(n, 1)
        layer_budget = budget if state.budget is None else min(state.budget, 8.0)
        bits = allocate(sensitivity, torch.full((n,), float(elements)), layer_budget)
        state.ranges, state.elements, state.bits = ranges, elements, bits
        return bits

    def observe_grad(self, module: torch.nn.Module, grad: torch.Tensor) -> None:
        """Record the gradient flowing back into ``module``'s output (dim 0 = samples)."""
        state = self.layers.get(id(module))
        if state is None or grad is None or grad.dim() == 0:
            return
        per_sample = grad.detach().float().pow(2).flatten(1).sum(1).double().cpu()
        mean = float(per_sample.mean()) if per_sample.numel() else 0.0
        state.grad_sq = mean if state.grad_sq is None else (
            self.momentum * state.grad_sq + (1 - self.momentum) * mean)
        relative = per_sample / mean if mean > 0 else torch.ones_like(per_sample)
        state.relative_grad = relative if state.relative_grad is None or \
            state.relative_grad.shape != relative.shape else state.relative_grad + relative

    def _rebalance(self) -> None:
        """Split the budget across layers from the step just done; update per-sample scales."""
        done = [s for s in self.layers.values() if s.ranges is not None and s.ranges.numel()]
        if not done:
            return
        indices = self._step_indices
        relatives = [s.relative_grad for s in done if s.relative_grad is not None]
        if indices is not None and relatives and all(r.numel() == indices.numel() for r in relatives):
            scale = torch.stack([r / r.mean().clamp_min(1e-30) for r in relatives]).mean(0)
            size = int(indices.max()) + 1
            if size > self.sample_scale.numel():
                grow = size - self.sample_scale.numel()
                self.sample_scale = torch.cat([self.sample_scale, torch.ones(grow)])
                self.sample_seen = torch.cat([self.sample_seen, torch.zeros(grow, dtype=torch.bool)])
            self.sample_scale[indices] = scale.float()
            self.sample_seen[indices] = True
        sensitivity = torch.cat([s.ranges * (s.grad_sq or 1.0) * self._sample_factor(s.ranges.numel())
                                 for s in done])
        cost = torch.cat([torch.full((s.ranges.numel(),), float(s.elements)) for s in done])
        from .config import config
        bits = allocate(sensitivity, cost, float(config.bits))
        start = 0
        for s in done:
            n = s.ranges.numel()
            s.budget = float(bits[start:start + n].double().mean())
            start += n


allocator = Allocator()


def set_sample_indices(indices: Optional[Sequence[int]]) -> None:
    """Tell the allocator which dataset samples the next forward pass holds (dim 0 order).

    With indices, each sample's gradient magnitude is remembered from the last time it was seen,
    as ActNN does; without, the layer's running mean stands for every sample.

    Args:
        indices: one dataset index per sample, or None.
    """
    allocator.set_sample_indices(indices)
