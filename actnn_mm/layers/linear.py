"""QLinear: ``aten.linear`` keeping its input compressed, any number of leading dims."""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import QLayer, autocast_inputs, grad_needed
from .saved import save_activation, saved_activation


class _LinearFunction(torch.autograd.Function):
    """``x @ weight.T + bias`` saving ``x`` compressed (dim 0 is the sample axis)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], module: nn.Module) -> torch.Tensor:
        save_activation(ctx, module, x if ctx.needs_input_grad[1] else None, weight)
        if x.dim() == 2:
            return torch.ops.aten.linear(x, weight, bias)
        # aten.linear would return a view of a 2-D result, which autograd forbids changing in
        # place (e.g. an inplace ReLU after an FFN's linear): write the 2-D result into the
        # output's own storage instead.
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        rows = x.reshape(-1, x.shape[-1])
        if bias is None:
            torch.mm(rows, weight.t(), out=out.view(-1, weight.shape[0]))
        else:
            torch.addmm(bias, rows, weight.t(), out=out.view(-1, weight.shape[0]))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = saved_activation(ctx, grad)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.matmul(weight) if need_x else None
        grad_w = rows.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = rows.sum(0) if need_b else None
        return grad_x, grad_w, grad_b, None


class QLinear(QLayer, nn.Linear):
    """:class:`torch.nn.Linear` keeping its input compressed for backward."""

    _actnn_base = nn.Linear
    _actnn_family = 'linear'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``input`` (..., in_features)."""
        if not grad_needed(input, self.weight, self.bias):
            return super().forward(input)
        if input.dim() == 1:  # unbatched: the codec needs a sample axis
            return self.forward(input.unsqueeze(0)).squeeze(0)
        x, weight, bias = autocast_inputs(input, self.weight, self.bias)
        return _LinearFunction.apply(x, weight, bias, self)
