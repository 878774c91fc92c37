"""QReLU: keeps a 1-bit mask of its positive outputs instead of the output itself."""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import QLayer, grad_needed
from .saved import load, save_packed


class _ReLUFunction(torch.autograd.Function):
    """ReLU (in place or not) whose backward needs only where the output is positive."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, module: nn.Module,
                inplace: bool) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = torch.relu_(x)
        else:
            out = torch.relu(x)
        ctx.mask = save_packed(out > 0, 1, module, out.nbytes)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], None, None]:
        mask, ctx.mask = load(ctx.mask), None
        return grad * mask, None, None


class QReLU(QLayer, nn.ReLU):
    """:class:`torch.nn.ReLU` keeping a 1-bit mask for backward (``inplace`` honoured)."""

    _actnn_base = nn.ReLU
    _actnn_family = 'relu'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """ReLU of ``input``."""
        if not grad_needed(input):
            return super().forward(input)
        return _ReLUFunction.apply(input, self, self.inplace)
