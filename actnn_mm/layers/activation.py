"""Activations: QReLU keeps a 1-bit mask of its positive outputs instead of the output itself;
QGELU and QSiLU keep their derivative at the input, compressed.

GELU and SiLU backward multiply the output gradient ``g`` by the derivative ``f'(x)``. Torch
keeps ``x``; a quantized ``x`` would make the gradient ``g f'(Q(x))`` biased, since ``f'`` is
nonlinear (by about ``g f'''(x) Var(Q(x)) / 2``). A compressing layer keeps ``f'(x)`` instead,
computed in forward by torch's backward op with a unit gradient: the gradient ``g Q(f'(x))`` is
linear in the rounded tensor, so stochastic rounding keeps it exactly unbiased, and ``f'`` lies in
[-0.13, 1.13] (GELU) or [-0.1, 1.1] (SiLU) however widely ``x`` spreads, so the rounding
steps are small too. Without compression ``x`` is kept (a copy for an in-place SiLU, as torch
does) and torch's backward op computes the exact gradient.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import QLayer, grad_needed
from .saved import compresses, masked, save_activation, save_positive, saved_activation


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
        ctx.mask = save_positive(out, module)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], None, None]:
        mask, ctx.mask = ctx.mask, None
        return masked(mask, grad), None, None


class QReLU(QLayer, nn.ReLU):
    """:class:`torch.nn.ReLU` keeping a 1-bit mask for backward (``inplace`` honoured)."""

    _actnn_base = nn.ReLU
    _actnn_family = 'relu'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """ReLU of ``input``."""
        if not grad_needed(input):
            return super().forward(input)
        return _ReLUFunction.apply(input, self, self.inplace)


class _DerivativeFunction(torch.autograd.Function):
    """Elementwise activation of ``module`` (in place or not) keeping ``f'(x)`` compressed, or
    ``x`` in full precision (see the module doc)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                module: '_QSmoothActivation', inplace: bool) -> torch.Tensor:
        ctx.derivative = compresses(x, module)
        if ctx.derivative:
            kept = module._backward_op(x.new_ones(()).expand_as(x), x)
        else:
            kept = x.clone() if inplace else x
        save_activation(ctx, module, kept)
        ctx.module = module
        if inplace:
            ctx.mark_dirty(x)
        return module._activation(x, inplace)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], None, None]:
        kept, = saved_activation(ctx, grad)
        grad_x = grad * kept if ctx.derivative else ctx.module._backward_op(grad, kept)
        return grad_x, None, None


class _QSmoothActivation(QLayer):
    """An activation whose backward needs ``f'(x)``: how to apply it, and torch's backward op."""

    _actnn_family = 'act'

    def _activation(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``f(x)``, written into ``x`` if ``inplace``."""
        raise NotImplementedError

    def _backward_op(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``grad * f'(x)`` by torch's backward kernel."""
        raise NotImplementedError


class QGELU(_QSmoothActivation, nn.GELU):
    """:class:`torch.nn.GELU` (``approximate`` 'none' or 'tanh') keeping its derivative
    compressed for backward."""

    _actnn_base = nn.GELU

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """GELU of ``input``."""
        if not grad_needed(input):
            return super().forward(input)
        return _DerivativeFunction.apply(input, self, False)

    def _activation(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def _backward_op(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_backward(grad, x, approximate=self.approximate)


class QSiLU(_QSmoothActivation, nn.SiLU):
    """:class:`torch.nn.SiLU` keeping its derivative compressed for backward (``inplace``
    honoured)."""

    _actnn_base = nn.SiLU

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """SiLU of ``input``."""
        if not grad_needed(input):
            return super().forward(input)
        return _DerivativeFunction.apply(input, self, self.inplace)

    def _activation(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        return F.silu(x, inplace=inplace)

    def _backward_op(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.silu_backward(grad, x)
