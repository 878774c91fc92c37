"""QGroupNorm and QLayerNorm: per-sample normalizations keeping their normalized input compressed.

Both normalize groups of values of one sample (GroupNorm: a group of channels with their spatial
positions; LayerNorm: the trailing ``normalized_shape`` dims) and then apply a per-element affine
map, so they share one autograd Function. As :mod:`.norm` does for batch norm, a compressing layer
keeps the *normalized* input ``xh = (x - mean) * rstd`` (unit spread in every group, whatever the
scale of ``x``) plus the tiny per-group ``mean`` and ``rstd``. Backward runs torch's kernel on
``xh`` with mean 0 and rstd 1 and scales the input gradient by ``rstd`` per group. The input
gradient's quadratic self term would carry the rounding variance ``v_i`` of each value as a bias
``w_i rstd g_i v_i / M`` (``M`` values per group); the correction of
:func:`.norm._rounding_bias` removes the group's mean rounding variance (estimated without bias
from ``mean(xh^2)``). That makes the gradient exactly unbiased when a group's values are rounded
with equal variance, and otherwise leaves ``w_i rstd g_i (v_i - mean(v)) / M``, which changes
sign from value to value (it averages out of upstream weight gradients) and shrinks as ``1/M``
(``M`` is C for a LayerNorm, C/G x H x W for a GroupNorm). Without compression the input itself
is kept and torch's kernels compute the exact gradients.

The per-group statistics stay on the autograd context rather than in ``ctx.save_for_backward``,
so :mod:`actnn_mm.generic` never compresses them.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import QLayer, autocast_on, grad_needed
from .norm import Grads, _channel_view, _reduce_dims, _rounding_bias
from .saved import compresses, save_activation, saved_activation


class _SampleNormFunction(torch.autograd.Function):
    """A per-sample normalization (``module``'s native op) keeping its normalized input
    compressed."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                module: '_QSampleNorm') -> torch.Tensor:
        out, mean, rstd = module._native(x, weight, bias)
        need_x = any(ctx.needs_input_grad[:2])  # the bias gradient needs no input
        ctx.normalized = need_x and compresses(x, module)
        if ctx.normalized:
            kept = module._native(x, None, None)[0]
        else:
            kept = x if need_x else None
        save_activation(ctx, module, kept, weight)
        ctx.stats, ctx.module = (mean, rstd), module
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        kept, weight = saved_activation(ctx, grad)
        (mean, rstd), ctx.stats = ctx.stats, None
        module, needs = ctx.module, list(ctx.needs_input_grad[:3])
        if kept is None:  # only the bias trains
            dims = module._param_dims(grad.dim())
            return None, None, grad.sum(dims, dtype=ctx.bias_dtype), None
        if not ctx.normalized:
            return (*module._native_backward(grad, kept, mean, rstd, weight, needs), None)
        return (*_normalized_backward(module, grad, kept, weight, rstd, needs), None)


def _normalized_backward(module: '_QSampleNorm', grad: torch.Tensor, xh: torch.Tensor,
                         weight: Optional[torch.Tensor], rstd: torch.Tensor,
                         needs: List[bool]) -> Grads:
    """Gradients from the rounded normalized input ``xh``.

    With mean 0 and rstd 1, torch's kernel returns the weight and bias gradients, and the input
    gradient divided by ``rstd`` per group; the rounding correction of
    :func:`.norm._rounding_bias` is computed per group without the weight (which varies inside a
    group) and multiplied by it per value.
    """
    grad_x, grad_w, grad_b = module._native_backward(
        grad, xh, torch.zeros_like(rstd), torch.ones_like(rstd), weight, needs)
    if grad_x is not None:
        ndim, rstd32 = xh.dim(), rstd.float()
        count = xh.numel() // max(rstd.numel(), 1)
        bias = _rounding_bias(module._sum_squares(xh) / count, None, rstd32, count, module.eps)
        bias = module._per_value(bias, ndim)
        if weight is not None:
            bias = bias * module._weight_view(weight, ndim)
        grad_x = grad_x.mul_(module._per_value(rstd32, ndim)).addcmul_(grad, bias)
    return grad_x, grad_w, grad_b


class _QSampleNorm(QLayer):
    """What QGroupNorm and QLayerNorm tell :class:`_SampleNormFunction` about their op."""

    _actnn_family = 'norm'
    eps: float

    def _native(self, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, mean, rstd) of torch's native op."""
        raise NotImplementedError

    def _native_backward(self, grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, weight: Optional[torch.Tensor],
                         needs: List[bool]) -> Grads:
        """(input, weight, bias) gradients of torch's native backward op."""
        raise NotImplementedError

    def _param_dims(self, ndim: int) -> List[int]:
        """Dims of an input of ``ndim`` dims that a parameter gradient sums over."""
        raise NotImplementedError

    def _weight_view(self, weight: torch.Tensor, ndim: int) -> torch.Tensor:
        """The affine weight shaped to broadcast over an input of ``ndim`` dims."""
        raise NotImplementedError

    def _per_value(self, stat: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-group statistic shaped to broadcast over an input of ``ndim`` dims."""
        raise NotImplementedError

    def _sum_squares(self, xh: torch.Tensor) -> torch.Tensor:
        """Float32 sum of ``xh ** 2`` over each group, shaped as the statistics."""
        raise NotImplementedError


def _autocast_float32(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """``tensors`` in float32 where autocast runs layer_norm and group_norm in float32 (CUDA);
    CPU autocast keeps the input dtype. The casts' own backward restores the dtypes."""
    device_type = tensors[0].device.type
    if device_type == 'cpu' or not autocast_on(device_type):
        return tensors
    return tuple(t if t is None or not t.is_floating_point() else t.float() for t in tensors)


class QGroupNorm(_QSampleNorm, nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` keeping its normalized input compressed for backward.

    Same constructor and attributes; inputs (N, C, *) in any memory layout.
    """

    _actnn_base = nn.GroupNorm

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (N, C, *) per sample and group of channels."""
        if not grad_needed(input, self.weight, self.bias):
            return super().forward(input)
        if input.dim() < 2:
            raise RuntimeError(f'Expected at least 2 dimensions for input tensor but received '
                               f'{input.dim()}')
        return _SampleNormFunction.apply(*_autocast_float32(input, self.weight, self.bias), self)

    def _sizes(self, x: torch.Tensor) -> Tuple[int, int, int]:
        """N, C and the number of values per channel and sample."""
        return x.shape[0], x.shape[1], math.prod(x.shape[2:])

    def _native(self, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.aten.native_group_norm(x, weight, bias, *self._sizes(x), self.num_groups,
                                                self.eps)

    def _native_backward(self, grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, weight: Optional[torch.Tensor],
                         needs: List[bool]) -> Grads:
        if grad.stride() != x.stride():  # torch 2.11's CPU kernel reads both in x's layout
            grad = torch.empty_like(x, dtype=grad.dtype).copy_(grad)
        return torch.ops.aten.native_group_norm_backward(grad, x, mean, rstd, weight,
                                                         *self._sizes(x), self.num_groups, needs)

    def _param_dims(self, ndim: int) -> List[int]:
        return [0] + list(range(2, ndim))

    def _weight_view(self, weight: torch.Tensor, ndim: int) -> torch.Tensor:
        return _channel_view(weight, ndim)

    def _per_value(self, stat: torch.Tensor, ndim: int) -> torch.Tensor:
        per_channel = stat.repeat_interleave(self.num_channels // self.num_groups, dim=1)
        return per_channel.reshape(list(per_channel.shape) + [1] * (ndim - 2))

    def _sum_squares(self, xh: torch.Tensor) -> torch.Tensor:
        grouped = xh.unflatten(1, (self.num_groups, -1))  # a view in any layout
        return torch.linalg.vector_norm(grouped, 2, dim=_reduce_dims(grouped)[1:],
                                        dtype=torch.float32) ** 2


class QLayerNorm(_QSampleNorm, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` keeping its normalized input compressed for backward.

    Same constructor and attributes (``elementwise_affine=False`` and ``bias=False`` included).
    Dim 0 is the codec's sample axis: for (B, L, C) transformer activations, a sample is a
    sequence; an unbatched input (just ``normalized_shape``) is treated as one sample.
    """

    _actnn_base = nn.LayerNorm

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (*, *normalized_shape) over its trailing dims."""
        if not grad_needed(input, self.weight, self.bias):
            return super().forward(input)
        if input.dim() == len(self.normalized_shape):  # unbatched: the codec needs a sample axis
            return self.forward(input.unsqueeze(0)).squeeze(0)
        return _SampleNormFunction.apply(*_autocast_float32(input, self.weight, self.bias), self)

    def _native(self, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ops.aten.native_layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def _native_backward(self, grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                         rstd: torch.Tensor, weight: Optional[torch.Tensor],
                         needs: List[bool]) -> Grads:
        bias = self.bias if needs[2] else None
        return torch.ops.aten.native_layer_norm_backward(grad, x, self.normalized_shape, mean,
                                                         rstd, weight, bias, needs)

    def _param_dims(self, ndim: int) -> List[int]:
        return list(range(ndim - len(self.normalized_shape)))

    def _weight_view(self, weight: torch.Tensor, ndim: int) -> torch.Tensor:
        return weight

    def _per_value(self, stat: torch.Tensor, ndim: int) -> torch.Tensor:
        return stat  # (*, 1, ..., 1) as native_layer_norm returns it

    def _sum_squares(self, xh: torch.Tensor) -> torch.Tensor:
        dims = list(range(xh.dim() - len(self.normalized_shape), xh.dim()))
        return torch.linalg.vector_norm(xh, 2, dim=dims, keepdim=True, dtype=torch.float32) ** 2
