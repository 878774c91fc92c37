"""Public codec API: ``quantize`` an activation into a :class:`CompressedTensor`, ``dequantize`` it.

Dim 0 is the sample axis. Each sample is split into groups of ``group_size`` values (in memory
order, so channels_last tensors are compressed without a copy); a group keeps its min and scale
in bfloat16 and its values as ``bits``-bit integers from stochastic rounding, so that
``E[dequantize(quantize(x))] == x``. ``bits`` is one width for all samples or one per sample (mixed
precision); all samples share one byte stream, each starting on a byte.
"""
import dataclasses
import itertools
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import ops

SUPPORTED_BITS = (1, 2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class CompressedTensor:
    """A quantized activation and what is needed to restore its shape, dtype and layout.

    Attributes:
        data: uint8 stream of all samples' packed values.
        meta: (groups, 2) bfloat16 min and scale of each group.
        bits: (N,) uint8 bit width of each sample.
        offsets: (N + 1,) int64 byte offset of each sample's stream in ``data``.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor.
        permutation: dims of the original tensor in memory order (None when contiguous).
        group_size: values per group.
    """

    data: torch.Tensor
    meta: torch.Tensor
    bits: torch.Tensor
    offsets: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    permutation: Optional[Tuple[int, ...]]
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes really held: the packed values, 4 per group, 9 per sample (width, offset) + 8."""
        return sum(t.numel() * t.element_size()
                   for t in (self.data, self.meta, self.bits, self.offsets))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: Union[str, torch.device],
           non_blocking: bool = False) -> 'CompressedTensor':
        """A copy on ``device`` (the same object if it is there already)."""
        if self.data.device == torch.device(device):
            return self
        move = (lambda t: t.to(device, non_blocking=non_blocking))
        return dataclasses.replace(self, data=move(self.data), meta=move(self.meta),
                                   bits=move(self.bits), offsets=move(self.offsets))

    def pin_memory(self) -> 'CompressedTensor':
        """A copy in page-locked CPU memory, so copies to and from a GPU can overlap compute."""
        return dataclasses.replace(self, data=self.data.pin_memory(), meta=self.meta.pin_memory(),
                                   bits=self.bits.pin_memory(), offsets=self.offsets.pin_memory())


def samples_view(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, ...]]]:
    """(N, M) view of ``x`` in memory order, and the permutation that restores it.

    A dense tensor whose sample dim is outermost in memory (contiguous, channels_last, ...) is
    viewed without a copy; any other layout is copied to contiguous first.
    """
    if x.dim() == 0:
        x = x.reshape(1)
    n = x.shape[0]
    m = x.numel() // n if n else int(torch.Size(x.shape[1:]).numel())
    if x.is_contiguous():
        return x.reshape(n, m), None
    order = (0,) + tuple(sorted(range(1, x.dim()), key=lambda d: -x.stride(d)))
    permuted = x.permute(order)
    if permuted.is_contiguous():
        return permuted.reshape(n, m), order
    return x.contiguous().reshape(n, m), None


def _bits_per_sample(bits: Union[int, torch.Tensor], n: int) -> List[int]:
    """Validated bit width of each of the ``n`` samples."""
    if isinstance(bits, torch.Tensor):
        if bits.dim() != 1 or bits.shape[0] != n or bits.dtype.is_floating_point \
                or bits.is_complex():
            raise ValueError(f'actnn_mm.compress.quantize: per-sample bits must be a 1-D integer '
                             f'tensor of length {n} (the size of dim 0), got {bits.dtype} '
                             f'of shape {tuple(bits.shape)}')
        widths = bits.tolist()
        bad = sorted(set(widths) - set(SUPPORTED_BITS))
        if bad:
            raise ValueError(f'actnn_mm.compress.quantize: bit widths must be in {SUPPORTED_BITS}, '
                             f'got {bad}')
        return widths
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f'actnn_mm.compress.quantize: bits must be one of {SUPPORTED_BITS} or a '
                         f'per-sample tensor of them, got {bits!r}')
    return [bits] * n


def _draw_seed() -> int:
    """A seed from torch's default CPU generator, so runs repeat under ``torch.manual_seed``."""
    return int(torch.empty((), dtype=torch.int64).random_())


# Checking a GPU tensor's values waits for the GPU. So on accelerators the finiteness checks of
# quantize are queued and run together, with one wait, at the next dequantize (the backward pass)
# or when the queue is long; on the CPU they run at once.
_DEFERRED_DEVICE_TYPES = ('cuda',)
_MAX_PENDING = 4096
_pending: List[Tuple[torch.Tensor, int]] = []


def check_pending() -> None:
    """Run the queued NaN/Inf checks of earlier ``quantize`` calls on accelerators.

    Raises:
        ValueError: one of those activations held NaN or Inf.
    """
    if not _pending:
        return
    pending = _pending[:]
    _pending.clear()
    failed = torch.stack([~torch.isfinite(meta).all() for meta, _ in pending]).cpu()
    for (meta, groups_per_sample), bad in zip(pending, failed.tolist()):
        if bad:
            _raise_if_not_finite(meta.cpu(), groups_per_sample)


# A bfloat16 is NaN or Inf when all its exponent bits are set, i.e. its bits without the sign are
# at least these: two integer ops test a whole meta, 10x faster than torch.isfinite on bfloat16.
_BF16_NON_FINITE = 0x7F80


def _check_finite(meta: torch.Tensor, groups_per_sample: int) -> None:
    if meta.device.type in _DEFERRED_DEVICE_TYPES:
        _pending.append((meta, groups_per_sample))
        if len(_pending) >= _MAX_PENDING:
            check_pending()
    elif meta.numel() and int((meta.view(torch.int16) & 0x7FFF).amax()) >= _BF16_NON_FINITE:
        _raise_if_not_finite(meta, groups_per_sample)


def _raise_if_not_finite(meta: torch.Tensor, groups_per_sample: int) -> None:
    bad = ~torch.isfinite(meta).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0]) // groups_per_sample
        raise ValueError(
            f'actnn_mm.compress.quantize: the activation has NaN or Inf values (or magnitudes '
            f'beyond the bfloat16 range) in {int(bad.sum())} of {meta.shape[0]} groups, the first '
            f'in sample {first}. Training has likely diverged: lower the learning rate or clip '
            f'gradients.')


def quantize(x: torch.Tensor, bits: Union[int, torch.Tensor], group_size: int = 256,
             seed: Optional[int] = None, stochastic: bool = True) -> CompressedTensor:
    """Compress ``x`` to ``bits`` bits per value (plus 32 bits per group).

    Args:
        x: float32, float16 or bfloat16 tensor; dim 0 is the sample axis.
        bits: 1, 2, 4 or 8, or a 1-D integer tensor with one of those per sample.
        group_size: values per group, a positive multiple of 8.
        seed: seed of the rounding noise; None draws one from torch's generator.
        stochastic: stochastic (unbiased) rounding; False rounds to nearest.

    Returns:
        The compressed tensor.

    Raises:
        TypeError: ``x`` is not a tensor of a supported dtype.
        ValueError: bad ``bits`` or ``group_size``, or ``x`` holds NaN or Inf.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f'actnn_mm.compress.quantize: expected a float32, float16 or bfloat16 '
                        f'tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x)}')
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or group_size % 8:
        raise ValueError(f'actnn_mm.compress.quantize: group_size must be a positive multiple of '
                         f'8, got {group_size!r}')
    samples, permutation = samples_view(x.detach())
    n, m = samples.shape
    widths = _bits_per_sample(bits, n)
    offsets = [0, *itertools.accumulate((m * b + 7) // 8 for b in widths)]
    seed = _draw_seed() if seed is None else (int(seed) + 2**63) % 2**64 - 2**63  # to int64
    widths_t = torch.tensor(widths, dtype=torch.uint8, device=x.device)
    offsets_t = torch.tensor(offsets, dtype=torch.int64, device=x.device)
    data, meta = ops.quantize(samples, widths_t, offsets_t, group_size, seed, bool(stochastic),
                              offsets[-1])
    _check_finite(meta, max(1, -(-m // group_size)))
    return CompressedTensor(data, meta, widths_t, offsets_t, x.shape, x.dtype, permutation,
                            group_size)


def dequantize(c: CompressedTensor,
               memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """The tensor ``c`` was made from, up to quantization noise: same shape, dtype, device, and
    layout unless ``memory_format`` asks for another.

    Args:
        c: the compressed tensor.
        memory_format: ``torch.channels_last`` to get a 4-D tensor quantized in NCHW order in
            that layout (each sample transposed as it is dequantized: no second full-size copy);
            None (or any other value) keeps the layout it was quantized from.

    Raises:
        ValueError: an activation quantized on an accelerator since the last check held NaN or
            Inf (see :func:`check_pending`).
    """
    check_pending()
    n = c.offsets.shape[0] - 1
    m = c.shape.numel() // n if n else 0
    if memory_format is torch.channels_last and len(c.shape) == 4 and c.permutation is None:
        channels = c.shape[1]
        values = ops.dequantize_transposed(c.data, c.meta, c.bits, c.offsets, n, channels,
                                           m // channels if channels else 0, c.group_size,
                                           c.dtype)
        return values.view(n, c.shape[2], c.shape[3], channels).permute(0, 3, 1, 2)
    samples = ops.dequantize(c.data, c.meta, c.bits, c.offsets, n, m, c.group_size, c.dtype)
    if c.permutation is None:
        return samples.reshape(c.shape)
    permuted: Sequence[int] = [c.shape[d] for d in c.permutation]
    inverse = sorted(range(len(c.permutation)), key=lambda i: c.permutation[i])
    return samples.reshape(permuted).permute(inverse)

