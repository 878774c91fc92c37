"""Public codec API: ``quantize`` an activation into a :class:`CompressedTensor`, ``dequantize`` it.

Dim 0 is the sample axis. Each sample keeps its min and range in float32 and is split into groups
of ``group_size`` values (in memory order, so channels_last tensors are compressed without a copy);
a group keeps its min and scale as two 8-bit codes on a grid its sample's min and range span, and
its values as ``bits``-bit integers from stochastic rounding, so that
``E[dequantize(quantize(x))] == x``. ``bits`` is one width for all samples or one per sample (mixed
precision); all samples share one byte stream, each starting on a byte.
"""
import dataclasses
import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from . import ops

SUPPORTED_BITS = (1, 2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def statistics_bits(group_size: int, values: Optional[int] = None) -> float:
    """Bits per value that the statistics (16 per group: its min and scale codes; 64 per sample:
    its min and range) cost on top of the values, in samples of ``values`` values (None: many,
    whole groups)."""
    if not values:
        return 16 / group_size
    return (16 * -(-values // group_size) + 64) / values


@dataclasses.dataclass
class CompressedTensor:
    """A quantized activation and what is needed to restore its shape, dtype and layout.

    Attributes:
        data: uint8 stream of all samples' packed values (sized from a bit budget, it may end in
            unused bytes).
        meta: (groups, 2) uint8 codes of each group's min and scale on its sample's grid.
        sample_meta: (N, 2) float32 min and range (max - min) of each sample, which span its
            grid; NaN where the sample held NaN or Inf.
        bits: (N,) uint8 bit width of each sample.
        offsets: (N + 1,) int64 byte offset of each sample's stream in ``data``.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor.
        permutation: dims of the original tensor in memory order (None when contiguous).
        group_size: values per group.
    """

    data: torch.Tensor
    meta: torch.Tensor
    sample_meta: torch.Tensor
    bits: torch.Tensor
    offsets: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    permutation: Optional[Tuple[int, ...]]
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes really held: the packed values, 2 per group, 17 per sample (min and range, width,
        offset) + 8."""
        return self.statistics_nbytes + sum(t.numel() * t.element_size()
                                            for t in (self.data, self.bits, self.offsets))

    @property
    def statistics_nbytes(self) -> int:
        """Bytes of the statistics: the groups' codes and the samples' min and range (part of
        :attr:`nbytes`)."""
        return sum(t.numel() * t.element_size() for t in (self.meta, self.sample_meta))

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
                                   sample_meta=move(self.sample_meta), bits=move(self.bits),
                                   offsets=move(self.offsets))

    def pin_memory(self) -> 'CompressedTensor':
        """A copy in page-locked CPU memory, so copies to and from a GPU can overlap compute."""
        return dataclasses.replace(self, data=self.data.pin_memory(), meta=self.meta.pin_memory(),
                                   sample_meta=self.sample_meta.pin_memory(),
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


def _widths(bits: Union[int, torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Validated (n,) uint8 bit width of each sample on ``device``.

    A per-sample tensor's values are checked here only on the CPU: reading them from an
    accelerator would wait for it, so there the kernels check them before touching memory.
    """
    if isinstance(bits, torch.Tensor):
        if bits.dim() != 1 or bits.shape[0] != n or bits.dtype.is_floating_point \
                or bits.is_complex() or bits.dtype == torch.bool:
            raise ValueError(f'actnn_mm.compress.quantize: per-sample bits must be a 1-D integer '
                             f'tensor of length {n} (the size of dim 0), got {bits.dtype} '
                             f'of shape {tuple(bits.shape)}')
        if bits.device.type == 'cpu':
            bad = sorted(set(bits.tolist()) - set(SUPPORTED_BITS))
            if bad:
                raise ValueError(f'actnn_mm.compress.quantize: bit widths must be in '
                                 f'{SUPPORTED_BITS}, got {bad}')
        return bits.to(device=device, dtype=torch.uint8, non_blocking=True)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f'actnn_mm.compress.quantize: bits must be one of {SUPPORTED_BITS} or a '
                         f'per-sample tensor of them, got {bits!r}')
    return torch.full((n,), bits, dtype=torch.uint8, device=device)


def _stream_layout(widths: torch.Tensor, bits: Union[int, torch.Tensor], m: int,
                   budget: Optional[float]) -> Tuple[torch.Tensor, int]:
    """Byte offsets of the samples' streams (on the widths' device) and the buffer's size.

    Computed without reading widths from an accelerator: a uniform width fixes every offset; a
    per-sample tensor's offsets are its prefix sum on the device, and the buffer is sized from
    ``budget`` (the widths' mean is at most that: the slack at the end is never read), or for
    8 bits per value without one.
    """
    n = widths.shape[0]
    if not isinstance(bits, torch.Tensor):
        per_sample = (m * bits + 7) // 8
        return torch.arange(n + 1, dtype=torch.int64, device=widths.device) * per_sample, \
            n * per_sample
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=widths.device)
    torch.cumsum((widths.long() * m + 7) // 8, dim=0, out=offsets[1:])
    if widths.device.type == 'cpu':  # exact: its values cost nothing to read
        return offsets, int(offsets[-1])
    if budget is None:
        return offsets, n * m
    # sum(ceil(m * b / 8)) <= (m * sum(b) + 7 n) / 8, and sum(b) <= n * budget
    return offsets, min(n * m, math.ceil(m * n * budget * (1 + 1e-9) / 8) + n)


def _draw_seed(device: torch.device) -> int:
    """A seed for the rounding noise on ``device`` that needs no read of device memory.

    On the CPU it is drawn from torch's default generator; on CUDA it is taken, as torch's own
    random ops do, from the device generator's Philox seed and offset, which are host values
    (the offset is advanced); both repeat under ``torch.manual_seed``. Elsewhere (devices
    without a generator, fake tensors while tracing) a counter is mixed with torch's seed.
    """
    if device.type == 'cpu':
        return int(torch.empty((), dtype=torch.int64, device='cpu').random_())
    generators = torch.cuda.default_generators if device.type == 'cuda' else ()
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if generators else 0)
    if index < len(generators):
        generator = generators[index]
        offset = generator.get_offset()
        generator.set_offset(offset + 4)  # Philox offsets advance in fours
        return _mix(generator.initial_seed(), offset)
    return _mix(torch.initial_seed(), next(_fallback_counter))


_fallback_counter = itertools.count()


def _mix(seed: int, counter: int) -> int:
    """A well-spread int64 from two integers (SplitMix64's finalizer of their combination)."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) - 2**63


# Devices where quantize checks for NaN/Inf at once (reading the check's result there costs
# nothing); elsewhere reading it would wait for the device.
_CHECKED_AT_ONCE = ('cpu',)


def checks_at_once(device: torch.device) -> bool:
    """Whether :func:`quantize` checks a tensor on ``device`` for NaN/Inf even when asked to
    ``defer_check``."""
    return device.type in _CHECKED_AT_ONCE


def not_finite(c: CompressedTensor) -> torch.Tensor:
    """A bool scalar on ``c``'s device: whether the activation held NaN or Inf (or a sample's
    range beyond float32), computed without reading device memory on the host."""
    return ~torch.isfinite(c.sample_meta).all()


def raise_if_not_finite(c: CompressedTensor) -> None:
    """Raise if ``c`` was quantized from NaN or Inf values (reads ``c`` on the host).

    Raises:
        ValueError: naming how many samples are affected and the first.
    """
    bad = ~torch.isfinite(c.sample_meta.cpu()).all(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f'actnn_mm.compress.quantize: the activation has NaN or Inf values (or a range beyond '
            f'float32) in {int(bad.sum())} of {bad.shape[0]} samples, the first in sample '
            f'{int(bad.nonzero()[0, 0])}. Training has likely diverged: lower the learning rate '
            f'or clip gradients.')


def quantize(x: torch.Tensor, bits: Union[int, torch.Tensor], group_size: int = 256,
             seed: Optional[int] = None, stochastic: bool = True, budget: Optional[float] = None,
             defer_check: bool = False) -> CompressedTensor:
    """Compress ``x`` to ``bits`` bits per value (plus 16 bits per group and 8 bytes per sample).

    Nothing is read back from an accelerator (so the host never waits for it) unless it must
    check there for NaN/Inf: pass ``defer_check`` and check :func:`not_finite` later instead.

    Args:
        x: float32, float16 or bfloat16 tensor; dim 0 is the sample axis.
        bits: 1, 2, 4 or 8, or a 1-D integer tensor with one of those per sample (on an
            accelerator its values are checked by the kernel, which fails the launch on a bad
            width).
        group_size: values per group, a positive multiple of 8.
        seed: seed of the rounding noise; None draws one (see :func:`_draw_seed`).
        stochastic: stochastic (unbiased) rounding; False rounds to nearest.
        budget: for per-sample ``bits`` on an accelerator, the most their mean can be: it
            sizes the buffer (else sized for 8 bits per value).
        defer_check: on an accelerator, leave the NaN/Inf check to the caller.

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
    widths = _widths(bits, n, x.device)
    offsets, total_bytes = _stream_layout(widths, bits, m, budget)
    seed = _draw_seed(x.device) if seed is None else (int(seed) + 2**63) % 2**64 - 2**63
    data, meta, sample_meta = ops.quantize(samples, widths, offsets, group_size, seed,
                                           bool(stochastic), total_bytes)
    compressed = CompressedTensor(data, meta, sample_meta, widths, offsets, x.shape, x.dtype,
                                  permutation, group_size)
    if checks_at_once(x.device):
        if bool(not_finite(compressed)):
            raise_if_not_finite(compressed)
    elif not defer_check:
        raise_if_not_finite(compressed)
    return compressed


def dequantize(c: CompressedTensor,
               memory_format: Optional[torch.memory_format] = None) -> torch.Tensor:
    """The tensor ``c`` was made from, up to quantization noise: same shape, dtype, device, and
    layout unless ``memory_format`` asks for another.

    Args:
        c: the compressed tensor.
        memory_format: ``torch.channels_last`` to get a 4-D tensor quantized in NCHW order in
            that layout (each sample transposed as it is dequantized: no second full-size copy);
            None (or any other value) keeps the layout it was quantized from.

    """
    n = c.offsets.shape[0] - 1
    m = c.shape.numel() // n if n else 0
    if memory_format is torch.channels_last and len(c.shape) == 4 and c.permutation is None:
        channels = c.shape[1]
        values = ops.dequantize_transposed(c.data, c.meta, c.sample_meta, c.bits, c.offsets, n,
                                           channels, m // channels if channels else 0,
                                           c.group_size, c.dtype)
        return values.view(n, c.shape[2], c.shape[3], channels).permute(0, 3, 1, 2)
    samples = ops.dequantize(c.data, c.meta, c.sample_meta, c.bits, c.offsets, n, m,
                             c.group_size, c.dtype)
    if c.permutation is None:
        return samples.reshape(c.shape)
    permuted: Sequence[int] = [c.shape[d] for d in c.permutation]
    inverse = sorted(range(len(c.permutation)), key=lambda i: c.permutation[i])
    return samples.reshape(permuted).permute(inverse)

