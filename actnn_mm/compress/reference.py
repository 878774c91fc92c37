"""Pure-PyTorch reference of the codec: the tests' oracle and the fallback without the extension.

It implements the two ops ``actnn_mm::quantize`` and ``actnn_mm::dequantize`` (schemas in
``csrc/actnn.cpp``) with the same arguments and mirrors ``csrc/common/codec.h`` operation for
operation, so its output equals the kernels' bit for bit. 32-bit unsigned arithmetic is done in
int64 tensors with explicit masks (torch has no full uint32 arithmetic).
"""
from typing import Callable, List, Tuple, Union

import torch

_MASK32 = 0xFFFFFFFF
_BF16_NAN = 0x7FC0
_BF16_ONE = 0x3F80

IntOrTensor = Union[int, torch.Tensor]


def _mul32(x: IntOrTensor, c: int) -> IntOrTensor:
    """x * c mod 2^32 for 0 <= x < 2^32, without int64 overflow (split c into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: IntOrTensor) -> IntOrTensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def rng_key(seed: int) -> Tuple[int, int]:
    seed &= (1 << 64) - 1
    lo = mix32((seed & _MASK32) ^ 0x9E3779B9)
    return lo, mix32((seed >> 32) ^ lo)


def uniform(key: Tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) for each int64 element index."""
    salt = mix32((index >> 32) ^ key[1]) ^ key[0]
    r = mix32((index & _MASK32) ^ salt)
    return (r >> 8).to(torch.float32) * 2.0**-24


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    return 1.0 / scale


def _float_bits(f: torch.Tensor) -> torch.Tensor:
    return f.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def bf16_to_float(h: torch.Tensor) -> torch.Tensor:
    u = h.to(torch.int64) << 16
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def bf16_round_down(f: torch.Tensor) -> torch.Tensor:
    u = _float_bits(f)
    step = ((u & 0xFFFF) != 0) & ((u >> 31) == 1)
    return ((u >> 16) + step.to(torch.int64)) & 0xFFFF


def bf16_round_up(f: torch.Tensor) -> torch.Tensor:
    u = _float_bits(f)
    return ((u >> 16) + ((u & 0xFFFF) != 0).to(torch.int64)) & 0xFFFF


def group_params(lo: torch.Tensor, hi: torch.Tensor,
                 levels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 bit patterns (int64) of each group's stored min and scale; see codec.h."""
    min_bits = bf16_round_down(lo + 0.0)  # -0 -> +0, as in codec.h
    mn = bf16_to_float(min_bits)
    rng = hi - mn
    levels_f = levels.to(torch.float32)
    invalid = ~torch.isfinite(rng) | ~torch.isfinite(mn)
    scale_bits = bf16_round_up(rng / levels_f)
    active = ~invalid & (rng != 0)
    while True:
        too_small = active & (rng * reciprocal(bf16_to_float(scale_bits)) > levels_f)
        if not bool(too_small.any()):
            break
        scale_bits = scale_bits + too_small.to(torch.int64)
    scale_bits = torch.where(rng == 0, _BF16_ONE, scale_bits)
    return (torch.where(invalid, _BF16_NAN, min_bits), torch.where(invalid, _BF16_NAN, scale_bits))


def _groupwise(x: torch.Tensor, group_size: int, pad: float) -> torch.Tensor:
    """(N, M) -> (N, groups, group_size), the last group padded with `pad`."""
    n, m = x.shape
    groups = -(-m // group_size)
    padded = x.new_full((n, groups * group_size), pad)
    padded[:, :m] = x
    return padded.view(n, groups, group_size)


def _per_element(per_group: torch.Tensor, group_size: int, m: int) -> torch.Tensor:
    """(N, groups) -> (N, M): each group's value repeated over its elements."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :m]


def quantize(x: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, group_size: int,
             seed: int, stochastic: bool, total_bytes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n, m = x.shape
    device = x.device
    xf = x.to(torch.float32)
    levels = (1 << bits.to(torch.int64)) - 1                      # (N,)
    lo = _groupwise(xf, group_size, float('inf')).amin(dim=2)
    hi = _groupwise(xf, group_size, float('-inf')).amax(dim=2)
    # A group is never all padding, so a group min/max of +-inf comes from the input.
    min_bits, scale_bits = group_params(lo, hi, levels[:, None].expand_as(lo))
    meta = torch.stack([min_bits, scale_bits], dim=2).reshape(-1, 2)
    meta = torch.where(meta >= 2**15, meta - 2**16, meta).to(torch.int16).view(torch.bfloat16)

    mn = _per_element(bf16_to_float(min_bits), group_size, m)
    scale = _per_element(bf16_to_float(scale_bits), group_size, m)
    if stochastic:
        index = torch.arange(n * m, dtype=torch.int64, device=device).view(n, m)
        u = uniform(rng_key(seed), index)
    else:
        u = torch.full((n, m), 0.5, device=device)
    level = torch.floor((xf - mn) * reciprocal(scale) + u)
    levels_f = levels.to(torch.float32)[:, None]
    level = torch.where(level < levels_f, level, levels_f).to(torch.int64)

    data = torch.zeros(total_bytes, dtype=torch.uint8, device=device)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().flatten()
        per_byte = 8 // b
        width = -(-m // per_byte)
        packed = torch.zeros(len(rows), width * per_byte, dtype=torch.int64, device=device)
        packed[:, :m] = level[rows]
        shifts = torch.arange(per_byte, device=device) * b
        packed = (packed.view(len(rows), width, per_byte) << shifts).sum(dim=2)
        where = offsets[rows][:, None] + torch.arange(width, device=device)
        data[where] = packed.to(torch.uint8)
    return data, meta


def dequantize_transposed(data: torch.Tensor, meta: torch.Tensor, bits: torch.Tensor,
                          offsets: torch.Tensor, num_samples: int, rows: int, cols: int,
                          group_size: int, dtype: torch.dtype) -> torch.Tensor:
    values = dequantize(data, meta, bits, offsets, num_samples, rows * cols, group_size, dtype)
    return values.view(num_samples, rows, cols).transpose(1, 2).contiguous()


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    flat = values.reshape(-1).view(torch.uint8)
    per_byte = 8 // bits
    tail = (-flat.numel()) % per_byte
    if tail:
        flat = torch.cat([flat, flat.new_zeros(tail)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=values.device)
    return ((flat.view(-1, per_byte) & (2**bits - 1)) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]


def pack_positive(values: torch.Tensor) -> torch.Tensor:
    return pack_bits(values > 0, 1)


def apply_mask(values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    keep = unpack_bits(mask, 1, values.numel()).view(values.shape).bool()
    scaled = (values.float() * torch.tensor(scale, dtype=torch.float32)).to(values.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=values.dtype, device=values.device))


def apply_mask_transposed(values: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    n, cols, rows = values.shape
    keep = unpack_bits(mask, 1, values.numel()).view(n, rows, cols).transpose(1, 2)
    return apply_mask(values, pack_bits(keep.contiguous(), 1), scale)


def _window_origins(shape: torch.Size, stride: List[int], padding: List[int],
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top row (OH, 1, 1) and left column (OW, 1) of the windows of a (P, OH, OW, K) tensor."""
    top = torch.arange(shape[1], device=device)[:, None, None] * stride[0] - padding[0]
    left = torch.arange(shape[2], device=device)[:, None] * stride[1] - padding[1]
    return top, left


def window_offsets(indices: torch.Tensor, width: int, kernel: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], dtype: torch.dtype) -> torch.Tensor:
    top, left = _window_origins(indices.shape, stride, padding, indices.device)
    rows = torch.div(indices, width, rounding_mode='floor')
    cols = indices - rows * width - left
    return ((rows - top) // dilation[0] * kernel[1] + cols // dilation[1]).to(dtype)


def window_indices(offsets: torch.Tensor, width: int, kernel: List[int], stride: List[int],
                   padding: List[int], dilation: List[int]) -> torch.Tensor:
    top, left = _window_origins(offsets.shape, stride, padding, offsets.device)
    offsets = offsets.long()
    i, j = offsets // kernel[1], offsets % kernel[1]
    return (top + i * dilation[0]) * width + left + j * dilation[1]


def batch_norm_sums(grad: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    g, x = grad.double(), xh.double()
    return torch.stack([g.sum(0), (g * x).sum(0), (x * x).sum(0)]).float()


def batch_norm_combine(xh: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor) -> None:
    a, b, c = coef  # float32 operations in the kernels' order
    xh.copy_(a * xh.float() + b * grad.float() + c)


RowSample = Tuple[int, int, int, float]  # count, len, step, scale: codec.h's RowSample


def range_sample(m: int, group_size: int, max_groups: int) -> RowSample:
    full = m // group_size
    if full == 0:
        return int(m > 0), m, 0, 1.0
    stride = -(-full // max_groups)
    count = -(-full // stride)
    return count, group_size, stride * group_size, 1.0 / count


def squares_sample(m: int, max_values: int, blocks: int) -> RowSample:
    if m <= max_values:
        return int(m > 0), m, 0, 1.0
    length = max_values // blocks
    return blocks, length, m // blocks, m / (blocks * length)


def _row_stats(x: torch.Tensor, sample: RowSample,
               term: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per row of ``x``: ``scale`` times the sum of ``term`` over its (N, count, length) float32
    runs."""
    count, length, step, scale = sample
    if count == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    runs = x.as_strided((x.shape[0], count, length), (x.stride(0), step, 1), x.storage_offset())
    return term(runs.float()).sum(1) * scale


def mean_square_range(x: torch.Tensor, group_size: int, max_groups: int) -> torch.Tensor:
    return _row_stats(x, range_sample(x.shape[1], group_size, max_groups),
                      lambda runs: (runs.amax(2) - runs.amin(2)).double().square())


def sum_of_squares(x: torch.Tensor, max_values: int, blocks: int) -> torch.Tensor:
    return _row_stats(x, squares_sample(x.shape[1], max_values, blocks),
                      lambda runs: runs.double().square().sum(2))


def dequantize(data: torch.Tensor, meta: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor,
               num_samples: int, sample_size: int, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    n, m = num_samples, sample_size
    device = data.device
    out = torch.empty(n, m, dtype=dtype, device=device)
    if n * m == 0:
        return out
    meta_f = meta.to(torch.float32).view(n, -1, 2)
    mn = _per_element(meta_f[..., 0], group_size, m)
    scale = _per_element(meta_f[..., 1], group_size, m)
    j = torch.arange(m, dtype=torch.int64, device=device)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().flatten()
        byte = data[offsets[rows][:, None] + (j * b >> 3)].to(torch.int64)
        level = (byte >> (j * b & 7)) & ((1 << b) - 1)
        out[rows] = (mn[rows] + level.to(torch.float32) * scale[rows]).to(dtype)
    return out
