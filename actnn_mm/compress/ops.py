"""The codec ops: the compiled kernels when ``actnn_mm._C`` is built, else the reference.

The schemas are defined once in C++ (``csrc/actnn.cpp``); this module registers their shape
(fake) implementations so the ops trace, and picks a backend per call from the device of its
first tensor: the extension serves the CPU and, when built with CUDA, CUDA devices, and tensors
without values (meta or fake tensors, through the fake implementations, on any device); any other
device (mps, xpu, CUDA without a CUDA build, ...) or a missing extension falls back to the
pure-PyTorch reference, with one warning.
"""
import warnings
from typing import List, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from . import reference

try:
    from actnn_mm import _C
except ImportError as error:  # not built: pip install --no-build-isolation -e .
    _C = None
    _IMPORT_ERROR = error


def extension_loaded() -> bool:
    """Whether the compiled codec kernels are in use (on the CPU, and on CUDA if built with it)."""
    return _C is not None


def _kernel_device_types() -> Tuple[str, ...]:
    """The device types the extension has kernels for."""
    return ('cpu', 'cuda') if _C is not None and _C.with_cuda else ('cpu',)


_KERNEL_DEVICE_TYPES = _kernel_device_types()


def _extension_serves(t: torch.Tensor) -> bool:
    """Whether the extension runs an op whose first tensor is ``t``: one on a device it has
    kernels for, or one without values (its fake implementation runs, whatever the device)."""
    if _C is None:
        return False
    device_type = t.device.type
    return device_type in _KERNEL_DEVICE_TYPES or device_type == 'meta' or is_fake(t)


_warned = False


def _warn_fallback(device: torch.device) -> None:
    global _warned
    if not _warned:
        if _C is None:
            why = f'the extension failed to import ({_IMPORT_ERROR})'
        elif device.type == 'cuda':
            why = 'the extension was built without CUDA (rebuild with FORCE_CUDA=1)'
        else:
            why = f'the extension has kernels for {" and ".join(_KERNEL_DEVICE_TYPES)} only'
        warnings.warn(f'actnn_mm: using the slow pure-PyTorch codec on {device}: {why}.',
                      stacklevel=3)
        _warned = True


if _C is not None:

    @torch.library.register_fake('actnn_mm::quantize')
    def _quantize_fake(x, bits, offsets, group_size, seed, stochastic, total_bytes):
        groups = x.shape[0] * -(-x.shape[1] // group_size)
        return (x.new_empty(total_bytes, dtype=torch.uint8),
                x.new_empty((groups, 2), dtype=torch.uint8),
                x.new_empty((x.shape[0], 2), dtype=torch.float32))

    @torch.library.register_fake('actnn_mm::dequantize')
    def _dequantize_fake(data, meta, sample_meta, bits, offsets, num_samples, sample_size,
                         group_size, dtype):
        return data.new_empty((num_samples, sample_size), dtype=dtype)

    @torch.library.register_fake('actnn_mm::dequantize_transposed')
    def _dequantize_transposed_fake(data, meta, sample_meta, bits, offsets, num_samples, rows,
                                    cols, group_size, dtype):
        return data.new_empty((num_samples, cols, rows), dtype=dtype)

    @torch.library.register_fake('actnn_mm::pack_bits')
    def _pack_bits_fake(values, bits):
        return values.new_empty(-(-values.numel() * bits // 8), dtype=torch.uint8)

    @torch.library.register_fake('actnn_mm::unpack_bits')
    def _unpack_bits_fake(packed, bits, numel):
        return packed.new_empty(numel)

    @torch.library.register_fake('actnn_mm::pack_positive')
    def _pack_positive_fake(values):
        return values.new_empty(-(-values.numel() // 8), dtype=torch.uint8)

    @torch.library.register_fake('actnn_mm::apply_mask')
    def _apply_mask_fake(values, mask, scale):
        return torch.empty_like(values)

    @torch.library.register_fake('actnn_mm::apply_mask_transposed')
    def _apply_mask_transposed_fake(values, mask, scale):
        return torch.empty_like(values)

    @torch.library.register_fake('actnn_mm::batch_norm_sums')
    def _batch_norm_sums_fake(grad, xh):
        return xh.new_empty((3, xh.shape[1]), dtype=torch.float32)

    @torch.library.register_fake('actnn_mm::batch_norm_combine')
    def _batch_norm_combine_fake(xh, grad, coef):
        return None

    @torch.library.register_fake('actnn_mm::mean_square_range')
    def _mean_square_range_fake(x, group_size, max_groups):
        return x.new_empty(x.shape[0], dtype=torch.float64)

    @torch.library.register_fake('actnn_mm::sum_of_squares')
    def _sum_of_squares_fake(x, max_values, blocks):
        return x.new_empty(x.shape[0], dtype=torch.float64)

    @torch.library.register_fake('actnn_mm::window_offsets')
    def _window_offsets_fake(indices, width, kernel, stride, padding, dilation, dtype):
        return torch.empty_like(indices, dtype=dtype)

    @torch.library.register_fake('actnn_mm::window_indices')
    def _window_indices_fake(offsets, width, kernel, stride, padding, dilation):
        return torch.empty_like(offsets, dtype=torch.int64)


def quantize(x: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, group_size: int,
             seed: int, stochastic: bool,
             total_bytes: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` quantized: its packed values, its groups' codes and its samples' min and range."""
    if _extension_serves(x):
        return torch.ops.actnn_mm.quantize(x, bits, offsets, group_size, seed, stochastic,
                                           total_bytes)
    _warn_fallback(x.device)
    return reference.quantize(x, bits, offsets, group_size, seed, stochastic, total_bytes)


def dequantize(data: torch.Tensor, meta: torch.Tensor, sample_meta: torch.Tensor,
               bits: torch.Tensor, offsets: torch.Tensor, num_samples: int, sample_size: int,
               group_size: int, dtype: torch.dtype) -> torch.Tensor:
    if _extension_serves(data):
        return torch.ops.actnn_mm.dequantize(data, meta, sample_meta, bits, offsets, num_samples,
                                             sample_size, group_size, dtype)
    _warn_fallback(data.device)
    return reference.dequantize(data, meta, sample_meta, bits, offsets, num_samples, sample_size,
                                group_size, dtype)


def dequantize_transposed(data: torch.Tensor, meta: torch.Tensor, sample_meta: torch.Tensor,
                          bits: torch.Tensor, offsets: torch.Tensor, num_samples: int, rows: int,
                          cols: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize` of samples quantized as (rows, cols) matrices, each transposed:
    (num_samples, cols, rows)."""
    if _extension_serves(data):
        return torch.ops.actnn_mm.dequantize_transposed(data, meta, sample_meta, bits, offsets,
                                                        num_samples, rows, cols, group_size,
                                                        dtype)
    _warn_fallback(data.device)
    return reference.dequantize_transposed(data, meta, sample_meta, bits, offsets, num_samples,
                                           rows, cols, group_size, dtype)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Contiguous uint8/bool ``values`` below ``2**bits`` packed ``8 // bits`` per byte."""
    if _extension_serves(values):
        return torch.ops.actnn_mm.pack_bits(values, bits)
    _warn_fallback(values.device)
    return reference.pack_bits(values, bits)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The ``numel`` uint8 values :func:`pack_bits` packed."""
    if _extension_serves(packed):
        return torch.ops.actnn_mm.unpack_bits(packed, bits, numel)
    _warn_fallback(packed.device)
    return reference.unpack_bits(packed, bits, numel)


def pack_positive(values: torch.Tensor) -> torch.Tensor:
    """``pack_bits(values > 0, 1)`` in one pass; ``values`` contiguous float."""
    if _extension_serves(values):
        return torch.ops.actnn_mm.pack_positive(values)
    _warn_fallback(values.device)
    return reference.pack_positive(values)


def apply_mask(values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``values * scale`` where the 1-bit packed ``mask`` (one bit per value, in memory order) is
    set, 0 elsewhere; ``values`` contiguous."""
    if _extension_serves(values):
        return torch.ops.actnn_mm.apply_mask(values, mask, scale)
    _warn_fallback(values.device)
    return reference.apply_mask(values, mask, scale)


def apply_mask_transposed(values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`apply_mask` of contiguous (N, cols, rows) ``values`` whose mask holds the bits of
    N (rows, cols) matrices."""
    if _extension_serves(values):
        return torch.ops.actnn_mm.apply_mask_transposed(values, mask, scale)
    _warn_fallback(values.device)
    return reference.apply_mask_transposed(values, mask, scale)


def batch_norm_sums(grad: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    """float32 (3, channels) sums of ``grad``, ``grad * xh`` and ``xh * xh`` per channel of
    contiguous (rows, channels) tensors."""
    if _extension_serves(xh):
        return torch.ops.actnn_mm.batch_norm_sums(grad, xh)
    _warn_fallback(xh.device)
    return reference.batch_norm_sums(grad, xh)


def batch_norm_combine(xh: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor) -> None:
    """``xh = coef[0] * xh + coef[1] * grad + coef[2]`` per channel of contiguous (rows,
    channels) tensors, in place."""
    if _extension_serves(xh):
        torch.ops.actnn_mm.batch_norm_combine(xh, grad, coef)
        return
    _warn_fallback(xh.device)
    reference.batch_norm_combine(xh, grad, coef)


def mean_square_range(x: torch.Tensor, group_size: int, max_groups: int) -> torch.Tensor:
    """float64 per row of a contiguous (N, M) float ``x``: the mean of ``(max - min) ** 2`` over
    every ``ceil(G / max_groups)``-th of the row's ``G`` full groups of ``group_size`` values (a row
    shorter than one group: over the row)."""
    if _extension_serves(x):
        return torch.ops.actnn_mm.mean_square_range(x, group_size, max_groups)
    _warn_fallback(x.device)
    return reference.mean_square_range(x, group_size, max_groups)


def sum_of_squares(x: torch.Tensor, max_values: int, blocks: int) -> torch.Tensor:
    """float64 per row of a contiguous (N, M) float ``x``: its sum of squares, estimated from
    ``blocks`` blocks of ``max_values // blocks`` values starting every ``M // blocks`` values
    (exact for rows of at most ``max_values``)."""
    if _extension_serves(x):
        return torch.ops.actnn_mm.sum_of_squares(x, max_values, blocks)
    _warn_fallback(x.device)
    return reference.sum_of_squares(x, max_values, blocks)


def window_offsets(indices: torch.Tensor, width: int, kernel: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], dtype: torch.dtype) -> torch.Tensor:
    """Position in its window (row-major over the kernel, in dilation steps) of each argmax of
    a max pooling: contiguous int64 (P, OH, OW, K) ``indices`` into input planes ``width`` wide,
    output position (oh, ow) at dims 1 and 2; kernel, stride, padding, dilation as (rows,
    columns); ``dtype`` uint8 (windows of up to 256 positions) or int32."""
    if _extension_serves(indices):
        return torch.ops.actnn_mm.window_offsets(indices, width, kernel, stride, padding,
                                                 dilation, dtype)
    _warn_fallback(indices.device)
    return reference.window_offsets(indices, width, kernel, stride, padding, dilation, dtype)


def window_indices(offsets: torch.Tensor, width: int, kernel: List[int], stride: List[int],
                   padding: List[int], dilation: List[int]) -> torch.Tensor:
    """Inverse of :func:`window_offsets`: the int64 indices."""
    if _extension_serves(offsets):
        return torch.ops.actnn_mm.window_indices(offsets, width, kernel, stride, padding,
                                                 dilation)
    _warn_fallback(offsets.device)
    return reference.window_indices(offsets, width, kernel, stride, padding, dilation)
