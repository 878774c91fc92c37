"""QConv1d/2d/3d and QConvTranspose1d/2d/3d: one autograd Function over ``aten.convolution``.

On the CPU, oneDNN runs an NCHW convolution through blocked copies of its activations: the forward
pass holds an output-sized buffer more than its output, the backward pass about two input-sized
buffers more than the dequantized input and the gradients. For layers whose activations outweigh
the weight, the backward pass therefore runs in channels_last, which oneDNN computes without
reordering (its input gradient stays channels_last), and the forward pass of those with a large
output over slices of the batch. A lighter convolution reading the same input as such a layer
returns its input gradient channels_last too (:class:`_Readers`).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..allocate import PROBE_SAMPLES
from .base import QLayer, autocast_inputs, grad_needed
from .saved import save_activation, saved_activation
from .state import state_of

Pads = Optional[List[int]]

# Activation elements per weight element from which a CPU layer takes the paths above (below, the
# weight's own reorders cost more than the activations' ones); the forward slices, and the output
# size from which a forward pass is sliced (below, the saving is small and the copy of each
# slice's output, and smaller batches' different rounding, not worth it).
_ACTIVATION_TO_WEIGHT = 4
_FORWARD_SLICES = 8
_SLICED_MIN_BYTES = 16 * 2**20


def _activation_heavy(x_shape: Sequence[int], out_numel: int, weight: torch.Tensor,
                      device: torch.device) -> bool:
    """Whether a 2-D convolution on the CPU should take the low-memory paths (module doc)."""
    return (device.type == 'cpu' and len(x_shape) == 4
            and math.prod(x_shape) + out_numel >= _ACTIVATION_TO_WEIGHT * weight.numel())


def _convolution(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 args: tuple) -> torch.Tensor:
    """``aten.convolution``; over slices of the batch on the CPU for an activation-heavy NCHW
    layer with a large output, so that oneDNN's reorder buffers are slice-sized (the same values
    up to rounding: oneDNN may pick another kernel for the smaller batch)."""
    stride, padding, dilation, transposed = args[:4]
    if transposed or x.dim() != 4 or x.shape[0] == 1 or not x.is_contiguous():
        return torch.ops.aten.convolution(x, weight, bias, *args)
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
               zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    out_numel = x.shape[0] * weight.shape[0] * math.prod(spatial)
    if (out_numel * x.element_size() < _SLICED_MIN_BYTES
            or not _activation_heavy(x.shape, out_numel, weight, x.device)):
        return torch.ops.aten.convolution(x, weight, bias, *args)
    n = x.shape[0]
    step = -(-n // _FORWARD_SLICES)
    first = torch.ops.aten.convolution(x[:step], weight, bias, *args)
    out = first.new_empty((n,) + tuple(first.shape[1:]))
    out[:step].copy_(first)
    del first
    for i in range(step, n, step):
        out[i:i + step].copy_(torch.ops.aten.convolution(x[i:i + step], weight, bias, *args))
    return out


class _Readers:
    """What the ActNN convolutions reading one tensor share: whether one of them returns its input
    gradient channels_last. Then they all do, so that autograd sums their gradients in one layout
    (an in-place add across layouts takes twice as long, and an NCHW sum would be copied to
    channels_last by each heavy convolution it reaches further down, e.g. all of a ResNet stage
    when the next stage's downsample convolution is light)."""

    __slots__ = ('channels_last',)

    def __init__(self) -> None:
        self.channels_last = False


def _readers(x: torch.Tensor) -> _Readers:
    """The :class:`_Readers` of ``x``, kept on the tensor (its readers see the same object)."""
    readers = getattr(x, '_actnn_conv_readers', None)
    if readers is None:
        readers = x._actnn_conv_readers = _Readers()
    return readers


def _offer_probe(ctx: torch.autograd.function.FunctionCtx, module: nn.Module,
                 padded: torch.Tensor, weight: torch.Tensor) -> None:
    """On the allocator's probe steps, offer the batch norm this convolution's output may feed
    the weight gradient of the first samples (:meth:`actnn_mm.allocate.Allocator.offer_probe`)."""
    transposed = ctx.args[3]
    if ctx.actnn_module is None or transposed:  # not adaptive, or nothing compressed
        return
    allocator = state_of(module).allocator
    if not allocator.probing:
        return
    x, args = padded[:PROBE_SAMPLES].detach().clone(), ctx.args

    def weight_gradient(grad: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(grad.to(x.dtype), x, weight, None, *args,
                                                   [False, True, False])[1]

    allocator.offer_probe(ctx, weight_gradient)


def made_by_conv(t: torch.Tensor) -> bool:
    """Whether ``t`` is the output of an ActNN convolution (plain or transposed)."""
    return isinstance(t.grad_fn, _ConvFunction._backward_cls)


class _ConvFunction(torch.autograd.Function):
    """Convolution (plain or transposed) saving its input compressed, optionally padded first.

    ``pre_pad`` (F.pad order, last dim first) is applied inside the Function with ``pad_mode``, so
    the padded input is kept only in compressed form and the input gradient is the pad's vector-
    Jacobian product of the padded input's gradient.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], module: nn.Module, pre_pad: Pads, pad_mode: str,
                stride: List[int], padding: List[int], dilation: List[int], transposed: bool,
                output_padding: List[int], groups: int) -> torch.Tensor:
        padded = x if pre_pad is None else F.pad(x, pre_pad, mode=pad_mode)
        out = _convolution(padded, weight, bias, (stride, padding, dilation, transposed,
                                                  output_padding, groups))
        save_activation(ctx, module, padded if ctx.needs_input_grad[1] else None, weight)
        # a compressed input comes back channels_last at no cost; a full-precision one would be
        # copied, so it keeps torch's path
        ctx.channels_last = (not transposed and not ctx.actnn_plain
                             and _activation_heavy(padded.shape, out.numel(), weight, out.device))
        ctx.readers = _readers(x)
        ctx.readers.channels_last |= ctx.channels_last
        ctx.input_shape = x.shape
        ctx.padded_shape = padded.shape
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.args = (stride, padding, dilation, transposed, output_padding, groups)
        ctx.pre_pad, ctx.pad_mode = pre_pad, pad_mode
        _offer_probe(ctx, module, padded, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        saved = list(saved_activation(ctx, grad,
                                       torch.channels_last if ctx.channels_last else None))
        needs = list(ctx.needs_input_grad[:3])
        if ctx.channels_last and saved[0] is not None:
            grad_x, grad_w, grad_b = _channels_last_backward(ctx, grad, saved, needs)
        else:
            padded, weight = saved
            if padded is None:  # only the input gradient is needed: the input's shape suffices
                padded = torch.empty((), dtype=grad.dtype, device=grad.device).expand(
                    ctx.padded_shape)
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, padded, weight, ctx.bias_sizes, *ctx.args, needs)
        if grad_x is not None and ctx.pre_pad is not None:
            grad_x = _pad_vjp(grad_x, ctx.input_shape, ctx.pre_pad, ctx.pad_mode)
        if grad_x is not None and ctx.readers.channels_last and grad_x.dim() == 4:
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        return (grad_x, grad_w, grad_b) + (None,) * 9


def _channels_last_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor,
                            saved: List[torch.Tensor], needs: List[bool]
                            ) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of an activation-heavy CPU convolution in channels_last, which oneDNN computes
    without reorders (module doc): the weight's first, then the input is freed before the input
    gradient is made (``saved``, the caller's ``[input, weight]``, gives it up)."""
    cl = torch.channels_last
    grad = grad.contiguous(memory_format=cl)
    x = saved.pop(0).contiguous(memory_format=cl)  # no copy: dequantized so
    weight = saved[0]
    grad_x = grad_w = grad_b = None
    if needs[1] or needs[2]:
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_sizes, *ctx.args, [False] + needs[1:])
    if needs[0]:
        # the input-gradient kernel reads only the shape and layout of its input: an untouched
        # (so not resident) buffer stands in for it
        like = torch.empty_like(x, memory_format=cl)
        del x
        grad_x = torch.ops.aten.convolution_backward(
            grad, like, weight, ctx.bias_sizes, *ctx.args, [True, False, False])[0]
    return grad_x, grad_w, grad_b


def _pad_vjp(grad: torch.Tensor, shape: torch.Size, pads: List[int], mode: str) -> torch.Tensor:
    """Gradient w.r.t. the input of ``F.pad(input, pads, mode)`` given the padded gradient."""
    with torch.enable_grad():
        dummy = grad.new_empty(shape).requires_grad_()  # padding is linear: values unused
        return torch.autograd.grad(F.pad(dummy, pads, mode=mode), dummy, grad)[0]


def _conv_padding(module: nn.Module) -> Tuple[Pads, str, List[int]]:
    """(pre_pad, pad_mode, conv padding) reproducing the module's ``padding``/``padding_mode``.

    Symmetric zero padding goes to the convolution itself; other modes and the asymmetric zero
    padding of ``padding='same'`` (even kernels) are applied by ``F.pad`` first.
    """
    dims = len(module.kernel_size)
    if module.padding == 'valid':
        left = right = [0] * dims
    elif module.padding == 'same':
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        left = [t // 2 for t in total]
        right = [t - t // 2 for t in total]
    else:
        left = right = list(module.padding)
    if module.padding_mode == 'zeros' and left == right:
        return None, 'constant', left
    pre_pad = [p for i in reversed(range(dims)) for p in (left[i], right[i])]
    mode = 'constant' if module.padding_mode == 'zeros' else module.padding_mode
    return pre_pad, mode, [0] * dims


def _transposed_output_padding(module: nn.Module, x: torch.Tensor,
                               output_size: Optional[Sequence[int]]) -> List[int]:
    """The output padding giving ``output_size`` (as ``nn.ConvTranspose*d`` computes it)."""
    if output_size is None:
        return list(module.output_padding)
    dims = len(module.kernel_size)
    sizes = list(output_size)
    if len(sizes) == x.dim():
        sizes = sizes[x.dim() - dims:]
    if len(sizes) != dims:
        raise ValueError(f'{type(module).__name__}: for {x.dim()}D input, output_size must have '
                         f'{dims} or {x.dim()} elements (got {len(output_size)})')
    result = []
    for d in range(dims):
        smallest = ((x.shape[x.dim() - dims + d] - 1) * module.stride[d] - 2 * module.padding[d]
                    + module.dilation[d] * (module.kernel_size[d] - 1) + 1)
        if not smallest <= sizes[d] < smallest + module.stride[d]:
            raise ValueError(f'requested an output size of {sizes}, but valid sizes range from '
                             f'{smallest} to {smallest + module.stride[d] - 1} in dim {d} (for '
                             f'an input of {list(x.shape[x.dim() - dims:])})')
        result.append(sizes[d] - smallest)
    return result


def _conv(module: nn.Module, x: torch.Tensor, transposed: bool,
          output_padding: List[int]) -> torch.Tensor:
    """Run the convolution of ``module`` on ``x`` through :class:`_ConvFunction`."""
    dims = len(module.kernel_size)
    if x.dim() == dims + 1:  # unbatched: the codec needs a sample axis
        return _conv(module, x.unsqueeze(0), transposed, output_padding).squeeze(0)
    x, weight, bias = autocast_inputs(x, module.weight, module.bias)
    pre_pad, pad_mode, padding = (None, 'constant', list(module.padding)) if transposed \
        else _conv_padding(module)
    return _ConvFunction.apply(x, weight, bias, module, pre_pad, pad_mode, list(module.stride),
                               padding, list(module.dilation), transposed, output_padding,
                               module.groups)


class _QConvMixin(QLayer):
    _actnn_family = 'conv'

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Convolve ``input``, keeping it compressed for backward."""
        if not grad_needed(input, self.weight, self.bias):
            return super().forward(input)
        return _conv(self, input, False, [0] * len(self.kernel_size))


class _QConvTransposeMixin(QLayer):
    _actnn_family = 'conv'

    def forward(self, input: torch.Tensor, output_size: Optional[List[int]] = None
                ) -> torch.Tensor:
        """Transposed convolution of ``input``, keeping it compressed for backward."""
        if not grad_needed(input, self.weight, self.bias):
            return super().forward(input, output_size)
        return _conv(self, input, True, _transposed_output_padding(self, input, output_size))


class QConv1d(_QConvMixin, nn.Conv1d):
    """:class:`torch.nn.Conv1d` keeping its input compressed for backward."""

    _actnn_base = nn.Conv1d


class QConv2d(_QConvMixin, nn.Conv2d):
    """:class:`torch.nn.Conv2d` keeping its input compressed for backward."""

    _actnn_base = nn.Conv2d


class QConv3d(_QConvMixin, nn.Conv3d):
    """:class:`torch.nn.Conv3d` keeping its input compressed for backward."""

    _actnn_base = nn.Conv3d


class QConvTranspose1d(_QConvTransposeMixin, nn.ConvTranspose1d):
    """:class:`torch.nn.ConvTranspose1d` keeping its input compressed for backward."""

    _actnn_base = nn.ConvTranspose1d


class QConvTranspose2d(_QConvTransposeMixin, nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` keeping its input compressed for backward."""

    _actnn_base = nn.ConvTranspose2d


class QConvTranspose3d(_QConvTransposeMixin, nn.ConvTranspose3d):
    """:class:`torch.nn.ConvTranspose3d` keeping its input compressed for backward."""

    _actnn_base = nn.ConvTranspose3d
