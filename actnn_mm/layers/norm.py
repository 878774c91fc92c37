"""QBatchNorm1d/2d/3d and QSyncBatchNorm, keeping their input compressed for backward.

With compression, a layer keeps its *normalized* input ``xh = (x - mean) * invstd`` (batch
statistics in training, running ones in eval) rather than ``x``: backward needs nothing else,
and every channel then has unit spread, so a quantization group spanning several channels (small
feature maps) rounds each with noise in proportion to its own spread instead of the widest
channel's, which the normalization would amplify. Training mode also keeps the per-channel mean
and inverse std; eval mode keeps the input only when the affine weight trains (mmdet's
``norm_eval=True``) and otherwise nothing but the running statistics. Without compression the
input itself is kept and torch's kernels compute the exact gradients.

QSyncBatchNorm synchronises statistics with ``torch.distributed`` collectives on any backend
(gloo on the CPU included).
"""
import functools
import sys
import types
from typing import Callable, FrozenSet, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as torch_module
from torch.nn.modules.batchnorm import _BatchNorm

from ..allocate import PROBE_SAMPLES
from ..compress import ops
from ..config import config
from .base import QLayer, channels_last_layout, grad_needed
from .conv import made_by_conv
from .saved import compresses, save_activation, saved_activation
from .state import state_of

Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]

# Key in the __dict__ of a layer whose input nothing but the layer reads when its structure's code
# passes it the convolution's output: (convolution, structure), set by
# :func:`actnn_mm.inplace.mark_inplace_norms`
INPLACE_INPUT = '_actnn_inplace_input'
# Modules whose frames lie between a layer's forward and the code that called the layer
_CALL_MACHINERY = (__name__, torch_module.__name__)


@functools.lru_cache(maxsize=None)
def _codes(structure: type) -> FrozenSet[types.CodeType]:
    """The code of the functions ``structure`` defines, with the functions nested in them (e.g.
    the ``_inner_forward`` of OpenMMLab's ResNet blocks)."""
    todo = [f.__code__ for f in vars(structure).values() if isinstance(f, types.FunctionType)]
    codes = set()
    while todo:
        code = todo.pop()
        codes.add(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return frozenset(codes)


def _caller_code() -> Optional[types.CodeType]:
    """The code that called the layer whose forward runs this (past Module.__call__)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get('__name__') in _CALL_MACHINERY:
        frame = frame.f_back
    return None if frame is None else frame.f_code


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def overwrites_input(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether training layer ``module``, called from its forward, may normalize ``x`` in place:
    nothing else can see ``x`` (the conditions are listed in :mod:`actnn_mm.inplace`)."""
    mark = module.__dict__.get(INPLACE_INPUT)
    if mark is None or not made_by_conv(x) or x.retains_grad:
        return False
    conv, structure = mark
    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or _hooked(conv) or _hooked(module)):
        return False
    return _caller_code() in _codes(structure)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-channel ``t`` shaped to broadcast over an (N, C, ...) tensor of ``ndim`` dims."""
    return t.reshape([1, -1] + [1] * (ndim - 2))


def _reduce_dims(x: torch.Tensor) -> List[int]:
    return [0] + list(range(2, x.dim()))


def _normalized(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` per channel, in ``x``'s dtype and layout, in one pass."""
    return torch.ops.aten.native_batch_norm(x, None, None, mean, var, False, 0.0, eps)[0]


def _keep_input(ctx: torch.autograd.function.FunctionCtx, module: nn.Module, x: torch.Tensor,
                need_x: bool, mean: torch.Tensor, var: torch.Tensor, eps: float,
                *exact: Optional[torch.Tensor]) -> None:
    """Save what backward needs of the input (nothing, ``x``, or the compressed normalized
    input, see the module doc) and the exact per-channel tensors."""
    ctx.normalized = need_x and compresses(x, module)
    kept = _normalized(x, mean, var, eps) if ctx.normalized else (x if need_x else None)
    save_activation(ctx, module, kept, *exact)


def _probe_for(module: nn.Module, x: torch.Tensor) -> Optional[Callable[[torch.Tensor],
                                                                         torch.Tensor]]:
    """The weight gradient function the convolution that made ``x`` offers on the adaptive
    allocator's probe steps, or None."""
    return state_of(module).allocator.take_probe(x) if config.adaptive else None


def _measure_propagation(module: nn.Module, probe: Callable[[torch.Tensor], torch.Tensor],
                         xh: torch.Tensor, weight: Optional[torch.Tensor],
                         invstd: torch.Tensor) -> None:
    """Tell the allocator how much of the rounding noise of ``xh`` reaches the weight gradient
    of the convolution before (``K`` of :mod:`actnn_mm.allocate`), from ``probe`` on its first
    samples."""
    sample = xh[:PROBE_SAMPLES]
    u = probe(sample).flatten(1).float()  # (channels, weights per channel)
    count = sample.numel() // sample.shape[1]
    scale = invstd if weight is None else invstd * weight
    propagation = (scale.float() * u.norm(dim=1) / count).square().mean()
    state_of(module).allocator.observe_propagation(module, propagation)


def _normalize_then_affine(ctx: torch.autograd.function.FunctionCtx, module: nn.Module,
                           x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], training: bool, momentum: float,
                           eps: float, overwrite: bool) -> torch.Tensor:
    """Forward of a layer that keeps its normalized input compressed, with one full-size tensor
    instead of two: ``xh`` is computed first (training: with the batch statistics, updating the
    running ones), kept compressed, then turned into the output in place (``xh * w + b``).

    With ``overwrite`` (:func:`overwrites_input`) a training layer normalizes into a float32,
    contiguous ``x`` itself: then only ``x`` is full-size (see :mod:`actnn_mm.inplace`).
    """
    if training:
        probe = _probe_for(module, x)
        if overwrite and x.dtype == torch.float32 and x.is_contiguous():
            mean = x.new_empty(x.shape[1])
            invstd = torch.empty_like(mean)
            torch.ops.aten.native_batch_norm.out(x, None, None, running_mean, running_var, True,
                                                 momentum, eps, out=x, save_mean=mean,
                                                 save_invstd=invstd)
            ctx.mark_dirty(x)
            xh = x
        else:
            xh, mean, invstd = torch.ops.aten.native_batch_norm(
                x, None, None, running_mean, running_var, True, momentum, eps)
        if probe is not None:
            _measure_propagation(module, probe, xh, weight, invstd)
        save_activation(ctx, module, xh, weight, mean, invstd)
    else:
        xh = _normalized(x, running_mean, running_var, eps)
        save_activation(ctx, module, xh, weight, running_mean, running_var)
    if weight is None and bias is None:
        return xh
    # in place in one pass: torch's eval-mode batch norm over a zero mean and unit variance
    # (1.6x faster than a mul_ and an add_; addcmul_ is slower than both over an NCHW tensor)
    like = weight if weight is not None else bias
    torch.ops.aten.native_batch_norm.out(
        xh, weight, bias, torch.zeros_like(like), torch.ones_like(like), False, 0.0, 0.0,
        out=xh, save_mean=like.new_empty(0), save_invstd=like.new_empty(0))
    return xh


def _channel_rows(grad: torch.Tensor, xh: torch.Tensor
                  ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``grad`` and ``xh`` as contiguous (rows, channels) views when the channels are innermost
    in both (2-D, or channels_last: what the fused batch-norm ops take), else None."""
    if xh.dim() == 2 and xh.is_contiguous() and grad.is_contiguous():
        return grad, xh
    if channels_last_layout(xh) is None or channels_last_layout(grad) is None:
        return None
    return tuple(t.permute(0, 2, 3, 1).reshape(-1, xh.shape[1]) for t in (grad, xh))


def _sum_squares(xh: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of ``xh ** 2`` in float32 (float64 for float64 ``xh``): the weight
    gradient of a batch norm of mean 0 and inverse std 1 whose input and output gradient are
    both ``xh``, one pass in any layout (reductions over dims 0, 2, ... of a channels_last
    tensor are 30x slower)."""
    dtype = torch.float64 if xh.dtype == torch.float64 else torch.float32
    zeros = xh.new_zeros(xh.shape[1], dtype=dtype)
    ones = torch.ones_like(zeros)
    return torch.ops.aten.native_batch_norm_backward(xh, xh, ones, None, None, zeros, ones, True,
                                                     0.0, [False, True, False])[1]


def _rounding_bias(mean_xh2: torch.Tensor, weight: Optional[torch.Tensor],
                   invstd: torch.Tensor, count: Union[int, torch.Tensor],
                   eps: float) -> torch.Tensor:
    """Per-channel ``c`` such that adding ``c * grad`` unbiases a training-mode input gradient
    computed from a stochastically rounded normalized input ``xh``.

    The gradient ``w s (g_i - mean(g) - xh_i mean_j(g_j xh_j))`` is linear in the rounded ``xh``
    except for the ``j = i`` part ``g_i xh_i^2 / M``, whose expectation adds the rounding variance
    ``v_i`` of ``xh_i``: ``E = exact + w s g_i v_i / M``. The exact ``xh`` has
    ``mean(xh^2) = 1 - eps s^2`` per channel, so the excess of the rounded one estimates the
    channel's mean rounding variance ``v`` without bias; adding ``w s g_i v / M`` back leaves
    ``w s g_i (v_i - v) / M``: zero on average over the channel, and small since normalized
    inputs of one channel are rounded with similar steps.

    Args:
        mean_xh2: per-channel mean of the rounded ``xh ** 2`` over the whole (possibly
            distributed) batch.
        weight: the affine weight or None.
        invstd: per-channel ``s``.
        count: values per channel ``M`` in the whole batch.
        eps: the layer's eps.
    """
    noise = mean_xh2 - (1 - eps * invstd * invstd)
    scale = invstd if weight is None else invstd * weight
    return noise * scale / count


def _training_backward(grad: torch.Tensor, xh: torch.Tensor, weight: Optional[torch.Tensor],
                       invstd: torch.Tensor, eps: float, needs: List[bool]) -> Grads:
    """Training-mode gradients from the rounded normalized input ``xh``: a dequantized tensor
    of this backward alone, over which a float32 input gradient is written (no third full-size
    tensor next to ``grad`` and ``xh``)."""
    scale = invstd if weight is None else invstd * weight
    if xh.dtype == torch.float32 and needs[0]:
        rows = _channel_rows(grad, xh)
        if rows is not None:  # one pass for the sums, one for grad_x (2x faster than torch's)
            sum_dy, sum_dy_xh, sum_xh2 = ops.batch_norm_sums(*rows)
        else:
            ones = torch.ones_like(invstd)
            _, sum_dy_xh, sum_dy = torch.ops.aten.native_batch_norm_backward(  # channel sums
                grad, xh, ones, None, None, torch.zeros_like(invstd), ones, True, eps,
                [False, True, True])
            sum_xh2 = _sum_squares(xh)
        count = xh.numel() // xh.shape[1]
        bias = _rounding_bias(sum_xh2 / count, weight, invstd, count, eps)
        # scale * (g - mean(g) - xh * mean(g xh)) + bias * g, written over xh
        coef = [-scale * sum_dy_xh / count, scale + bias, -scale * sum_dy / count]
        if rows is not None:
            ops.batch_norm_combine(rows[1], rows[0], torch.stack(coef))
            grad_x = xh
        else:
            grad_x = xh.mul_(_channel_view(coef[0], xh.dim()))
            grad_x.addcmul_(grad, _channel_view(coef[1], xh.dim()))
            grad_x.add_(_channel_view(coef[2], xh.dim()))
        dtype = invstd.dtype if weight is None else weight.dtype
        return (grad_x, sum_dy_xh.to(dtype) if needs[1] else None,
                sum_dy.to(dtype) if needs[2] else None)
    grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(  # xh: mean 0, invstd 1
        grad, xh, scale, None, None, torch.zeros_like(invstd), torch.ones_like(invstd), True,
        eps, needs)
    if grad_x is not None:
        count = xh.numel() // xh.shape[1]
        bias = _rounding_bias(_sum_squares(xh) / count, weight, invstd, count, eps)
        grad_x.addcmul_(grad, _channel_view(bias, xh.dim()))
    return grad_x, grad_w, grad_b


def _eval_backward(grad: torch.Tensor, xh: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], invstd: torch.Tensor,
                   needs: List[bool]) -> Grads:
    """Eval-mode gradients: the layer is a per-channel affine map of ``xh`` (None when only the
    input gradient is needed)."""
    dims, ndim = _reduce_dims(grad), grad.dim()
    scale = invstd if weight is None else invstd * weight
    grad_x = (grad * _channel_view(scale, ndim)).to(grad.dtype) if needs[0] else None
    grad_w = (grad * xh).sum(dims, dtype=invstd.dtype).to(weight.dtype) if needs[1] else None
    grad_b = grad.sum(dims, dtype=invstd.dtype).to(weight.dtype) if needs[2] else None
    return grad_x, grad_w, grad_b


class _BatchNormFunction(torch.autograd.Function):
    """``aten.native_batch_norm`` saving its (normalized) input compressed."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                module: nn.Module, training: bool, momentum: float, eps: float,
                overwrite: bool) -> torch.Tensor:
        ctx.training, ctx.eps = training, eps
        need_x = any(ctx.needs_input_grad[:2]) if training else ctx.needs_input_grad[1]
        if need_x and compresses(x, module):
            ctx.normalized = True
            return _normalize_then_affine(ctx, module, x, weight, bias, running_mean, running_var,
                                          training, momentum, eps, overwrite)
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.normalized = False
        exact = (mean, invstd) if training else (running_mean, running_var)
        save_activation(ctx, module, x if need_x else None, weight, *exact)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        kept, weight, first, second = saved_activation(ctx, grad, channels_last_layout(grad))
        needs = list(ctx.needs_input_grad[:3])
        if ctx.training and kept is None:  # only the bias needs a gradient
            grads = _eval_backward(grad, None, weight, second, needs)
        elif ctx.training and ctx.normalized:
            grads = _training_backward(grad, kept, weight, second, ctx.eps, needs)
        elif ctx.training:  # full precision: torch's own kernel
            grads = torch.ops.aten.native_batch_norm_backward(
                grad, kept, weight, None, None, first, second, True, ctx.eps, needs)
        else:
            if kept is not None and not ctx.normalized:
                kept = _normalized(kept, first, second, ctx.eps)
            grads = _eval_backward(grad, kept, weight, (second + ctx.eps).rsqrt(), needs)
        return (*grads,) + (None,) * 7


def _sync_batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                     running_var: Optional[torch.Tensor], momentum: float, eps: float,
                     group: dist.ProcessGroup) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """Batch norm with statistics over all processes of ``group``; updates running stats.

    Each process contributes (count, mean, biased variance) per channel, combined with the
    parallel variance formula (stable, unlike sums of squares).

    Returns:
        (output, global mean, global biased variance, global count per channel (0-dim)).
    """
    x32 = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(x32, dim=_reduce_dims(x), correction=0)
    local = torch.cat([mean.new_full((1,), x.numel() // max(x.shape[1], 1)), mean, var])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)
    channels = mean.numel()
    counts, means, variances = stats[:, :1], stats[:, 1:channels + 1], stats[:, channels + 1:]
    total = counts.sum()  # a tensor: no host synchronisation on accelerators
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = var * (total / (total - 1).clamp_min(1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    out = torch.ops.aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
    return out, mean, var, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """:func:`_sync_batch_norm` saving its (normalized) input compressed; backward all-reduces
    the gradient sums (parameter gradients stay local, as in torch: DDP averages them)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                module: nn.Module, momentum: float, eps: float,
                group: dist.ProcessGroup) -> torch.Tensor:
        probe = _probe_for(module, x)
        out, mean, var, total = _sync_batch_norm(x, weight, bias, running_mean, running_var,
                                                 momentum, eps, group)
        invstd = (var + eps).rsqrt()
        if probe is not None:
            _measure_propagation(module, probe, _normalized(x[:PROBE_SAMPLES], mean, var, eps),
                                 weight, invstd)
        _keep_input(ctx, module, x, True, mean, var, eps, weight, mean, invstd)
        ctx.total, ctx.group, ctx.eps = total, group, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        kept, weight, mean, invstd = saved_activation(ctx, grad)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims, ndim = _reduce_dims(kept), kept.dim()
        xh = kept.to(mean.dtype)
        if not ctx.normalized:
            xh = (xh - _channel_view(mean, ndim)) * _channel_view(invstd, ndim)
        sum_dy = grad.sum(dims, dtype=mean.dtype)
        sum_dy_xh = (grad * xh).sum(dims, dtype=mean.dtype)
        grad_w = sum_dy_xh.to(weight.dtype) if need_w else None
        grad_b = sum_dy.to(weight.dtype) if need_b else None
        if not need_x:
            return (None, grad_w, grad_b) + (None,) * 6
        sums = [sum_dy, sum_dy_xh] + ([_sum_squares(xh)] if ctx.normalized else [])
        means = torch.cat(sums)  # sums, divided by the total count below
        dist.all_reduce(means, group=ctx.group)
        mean_dy, mean_dy_xh, *mean_xh2 = (means / ctx.total).chunk(len(sums))
        scale = invstd if weight is None else invstd * weight
        grad_x = ((grad - _channel_view(mean_dy, ndim) - xh * _channel_view(mean_dy_xh, ndim))
                  * _channel_view(scale, ndim))
        if ctx.normalized:
            bias = _rounding_bias(mean_xh2[0], weight, invstd, ctx.total, ctx.eps)
            grad_x.addcmul_(grad, _channel_view(bias, ndim))
        return (grad_x.to(kept.dtype), grad_w, grad_b) + (None,) * 6


def _momentum_factor(module: nn.Module) -> float:
    """Running-stat update factor of this forward (counts the batch), as torch's _BatchNorm."""
    if not (module.training and module.track_running_stats) or module.num_batches_tracked is None:
        return 0.0 if module.momentum is None else module.momentum
    module.num_batches_tracked.add_(1)
    if module.momentum is None:
        return 1.0 / float(module.num_batches_tracked)
    return module.momentum


def _tracked_stats(module: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Running stats to pass: used in eval, updated in training only if tracked."""
    if module.training and not module.track_running_stats:
        return None, None
    return module.running_mean, module.running_var


class _QBatchNormMixin(QLayer):
    _actnn_family = 'norm'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (N, C, ...), keeping it compressed for backward."""
        self._check_input_dim(input)
        if not grad_needed(input, self.weight, self.bias):
            return super().forward(input)
        training = self.training or (self.running_mean is None and self.running_var is None)
        if training and input.numel() // max(input.shape[1], 1) == 1:
            raise ValueError(f'Expected more than 1 value per channel when training, got input '
                             f'size {input.size()}')
        factor = _momentum_factor(self)
        overwrite = training and overwrites_input(self, input)
        return _BatchNormFunction.apply(input, self.weight, self.bias, *_tracked_stats(self), self,
                                        training, factor, self.eps, overwrite)


class QBatchNorm1d(_QBatchNormMixin, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` keeping its input compressed for backward."""

    _actnn_base = nn.BatchNorm1d


class QBatchNorm2d(_QBatchNormMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` keeping its input compressed for backward."""

    _actnn_base = nn.BatchNorm2d


class QBatchNorm3d(_QBatchNormMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` keeping its input compressed for backward."""

    _actnn_base = nn.BatchNorm3d


class QSyncBatchNorm(_QBatchNormMixin, _BatchNorm):
    """:class:`torch.nn.SyncBatchNorm` keeping its input compressed, on any device and backend.

    In training with more than one process in its group, statistics and gradient sums are
    combined with ``torch.distributed`` collectives (gloo on the CPU works, unlike torch's own
    SyncBatchNorm); otherwise it behaves as :class:`QBatchNorm2d` for inputs of any rank >= 2.

    Same constructor and attributes as ``nn.SyncBatchNorm`` (conversion swaps the class both
    ways), but deliberately not a subclass of it: DDP refuses ``nn.SyncBatchNorm`` layers in CPU
    modules, and mmengine's ``revert_sync_batchnorm`` would turn it back into a plain BatchNorm.
    """

    _actnn_base = nn.SyncBatchNorm

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
                 ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {input.dim()}D input)')

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The process group to synchronise over in this forward, or None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise ``input`` (N, C, ...) with statistics of all processes in training."""
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        factor = _momentum_factor(self)
        args = (input, self.weight, self.bias, *_tracked_stats(self))
        if not grad_needed(input, self.weight, self.bias):
            return _sync_batch_norm(*args, factor, self.eps, group)[0]
        return _SyncBatchNormFunction.apply(*args, self, factor, self.eps, group)
