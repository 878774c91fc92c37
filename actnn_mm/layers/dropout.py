"""QDropout: keeps its dropout mask packed to 1 bit per element."""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import QLayer, grad_needed
from .saved import masked, save_packed


class _DropoutFunction(torch.autograd.Function):
    """``aten.native_dropout`` (in place or not) saving its mask packed."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, module: nn.Module,
                p: float, inplace: bool) -> torch.Tensor:
        out, mask = torch.ops.aten.native_dropout(x, p, True)
        ctx.scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
        ctx.mask = save_packed(mask, 1, module, mask.nbytes)
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], None, None, None]:
        mask, ctx.mask = ctx.mask, None
        return masked(mask, grad, ctx.scale), None, None, None


class QDropout(QLayer, nn.Dropout):
    """:class:`torch.nn.Dropout` keeping a 1-bit mask for backward (``inplace`` honoured)."""

    _actnn_base = nn.Dropout
    _actnn_family = 'dropout'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Dropout of ``input`` in training mode, identity in eval mode."""
        if not (self.training and self.p > 0 and grad_needed(input)):
            return super().forward(input)
        return _DropoutFunction.apply(input, self, self.p, self.inplace)
