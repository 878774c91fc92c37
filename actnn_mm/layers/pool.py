"""QMaxPool2d: keeps the argmax of each window as its offset inside the window.

torch keeps the input and int64 indices into the input plane; the backward needs only the
indices, and an index is determined by its window and its offset in the window: 4 bits for
windows of up to 16 positions (3x3, 4x4), a byte up to 256, else an int32.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import QLayer, channels_last_layout, grad_needed
from .saved import load, save_packed, stash


def _pair(value: object) -> List[int]:
    """An int or pair argument of nn.MaxPool2d as a list of two ints."""
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _window_origins(out_shape: torch.Size, stride: List[int], padding: List[int],
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row (OH, 1) and column (OW,) of the top-left input position of each window."""
    rows = torch.arange(out_shape[-2], device=device) * stride[0] - padding[0]
    cols = torch.arange(out_shape[-1], device=device) * stride[1] - padding[1]
    return rows.unsqueeze(1), cols


def _offsets(indices: torch.Tensor, width: int, kernel: List[int], stride: List[int],
             padding: List[int], dilation: List[int]) -> torch.Tensor:
    """Position of each argmax (flat index into its input plane) inside its window."""
    top, left = _window_origins(indices.shape, stride, padding, indices.device)
    rows = torch.div(indices, width, rounding_mode='floor')
    cols = torch.sub(indices, rows, alpha=width).sub_(left)
    rows = rows.sub_(top)
    if dilation[0] != 1:
        rows = rows.div_(dilation[0], rounding_mode='floor')
    if dilation[1] != 1:
        cols = cols.div_(dilation[1], rounding_mode='floor')
    return cols.add_(rows, alpha=kernel[1])


def _indices(offsets: torch.Tensor, width: int, kernel: List[int], stride: List[int],
             padding: List[int], dilation: List[int]) -> torch.Tensor:
    """Inverse of :func:`_offsets`: flat input-plane indices (int64) of the argmaxes."""
    top, left = _window_origins(offsets.shape, stride, padding, offsets.device)
    offsets = offsets.long()
    rows = torch.div(offsets, kernel[1], rounding_mode='floor')
    cols = offsets.sub_(rows, alpha=kernel[1])
    if dilation[1] != 1:
        cols = cols.mul_(dilation[1])
    return cols.add_(rows, alpha=dilation[0] * width).add_(top * width + left)


class _MaxPool2dFunction(torch.autograd.Function):
    """``aten.max_pool2d_with_indices`` saving window-relative argmax offsets."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, module: nn.Module,
                kernel: List[int], stride: List[int], padding: List[int], dilation: List[int],
                ceil_mode: bool) -> torch.Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding,
                                                              dilation, ceil_mode)
        offsets = _offsets(indices, x.shape[-1], kernel, stride, padding, dilation)
        window, full_bytes = kernel[0] * kernel[1], x.nbytes + indices.nbytes
        if window <= 256:
            bits = 4 if window <= 16 else 8
            ctx.offsets = save_packed(offsets.to(torch.uint8), bits, module, full_bytes)
        else:
            ctx.offsets = stash(offsets.to(torch.int32), module, full_bytes)
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
        else:  # the gradient's: the indices (1 byte each until _indices) and grad_x too
            offsets = offsets.contiguous(memory_format=layout)
            like_input = torch.empty(ctx.input_shape, dtype=grad.dtype, device=grad.device,
                                     memory_format=layout)
        indices = _indices(offsets, ctx.input_shape[-1], *ctx.args[:4])
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
