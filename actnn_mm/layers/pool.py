"""QMaxPool2d: keeps the argmax of each window as its offset inside the window.

torch keeps the input and int64 indices into the input plane; the backward needs only the
indices, and an index is determined by its window and its offset in the window: 4 bits for
windows of up to 16 positions (3x3, 4x4), a byte up to 256, else an int32.
"""
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..compress import ops
from .base import QLayer, channels_last_layout, grad_needed
from .saved import load, save_packed, stash


def _pair(value: object) -> List[int]:
    """An int or pair argument of nn.MaxPool2d as a list of two ints."""
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _per_window(op: Callable[..., torch.Tensor], t: torch.Tensor, *args: object) -> torch.Tensor:
    """A window op (:func:`ops.window_offsets` or :func:`ops.window_indices`) over ``t``,
    (N, C, OH, OW) or (C, OH, OW) in either layout, seen as the (P, OH, OW, K) tensor it takes;
    the result has ``t``'s shape and layout."""
    batched = t if t.dim() == 4 else t.unsqueeze(0)
    if channels_last_layout(batched) is not None:
        out = op(batched.permute(0, 2, 3, 1), *args).permute(0, 3, 1, 2)
    else:
        out = op(batched.contiguous().view(-1, *batched.shape[2:], 1), *args).view(batched.shape)
    return out if t.dim() == 4 else out.squeeze(0)


class _MaxPool2dFunction(torch.autograd.Function):
    """``aten.max_pool2d_with_indices`` saving window-relative argmax offsets."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, module: nn.Module,
                kernel: List[int], stride: List[int], padding: List[int], dilation: List[int],
                ceil_mode: bool) -> torch.Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding,
                                                              dilation, ceil_mode)
        window, full_bytes = kernel[0] * kernel[1], x.nbytes + indices.nbytes
        offsets = _per_window(ops.window_offsets, indices, x.shape[-1], kernel, stride, padding,
                              dilation, torch.uint8 if window <= 256 else torch.int32)
        if window <= 256:
            ctx.offsets = save_packed(offsets, 4 if window <= 16 else 8, module, full_bytes)
        else:
            ctx.offsets = stash(offsets, module, full_bytes)
        ctx.input_shape, ctx.input_stride = x.shape, x.stride()
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        offsets, ctx.offsets = load(ctx.offsets), None
        layout = channels_last_layout(grad)
        if layout is None:  # the input's layout
            like_input = grad.new_empty_strided(ctx.input_shape, ctx.input_stride)
        else:  # the gradient's: the offsets (made 1 byte each), the indices and grad_x too
            offsets = offsets.contiguous(memory_format=layout)
            like_input = torch.empty(ctx.input_shape, dtype=grad.dtype, device=grad.device,
                                     memory_format=layout)
        indices = _per_window(ops.window_indices, offsets, ctx.input_shape[-1], *ctx.args[:4])
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, like_input, *ctx.args,
                                                                 indices)
        return (grad_x,) + (None,) * 6


class QMaxPool2d(QLayer, nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` keeping compact argmax offsets instead of input and indices.

    ``padding``, ``dilation`` and ``ceil_mode`` are supported; ``return_indices=True`` is not
    (:func:`actnn_mm.QModule` skips such layers) and raises ValueError in training.
    """

    _actnn_base = nn.MaxPool2d
    _actnn_family = 'pool'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Max pooling of ``input`` (N, C, H, W) or (C, H, W)."""
        if not grad_needed(input):
            return super().forward(input)
        if self.return_indices:
            raise ValueError('QMaxPool2d does not support return_indices=True; use '
                             'torch.nn.MaxPool2d for this layer')
        stride = self.stride or self.kernel_size  # None or [] mean the kernel size
        return _MaxPool2dFunction.apply(input, self, _pair(self.kernel_size), _pair(stride),
                                        _pair(self.padding), _pair(self.dilation),
                                        bool(self.ceil_mode))
