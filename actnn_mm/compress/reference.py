"""Pure-PyTorch reference of the codec: the tests' oracle and the fallback without the extension.

It implements the ops ``actnn_mm::quantize`` and ``actnn_mm::dequantize`` (schemas in
``csrc/actnn.cpp``) with the same arguments and computes every value of ``csrc/common/codec.h``
with the same float32 operations, so its output equals the kernels' bit for bit. A group's codes,
which the kernels find by stepping from a guess, are found here by bisection (each is the largest
code that satisfies its condition): an independent check of the kernels' search. 32-bit unsigned
arithmetic is done in int64 tensors with explicit masks (torch has no full uint32 arithmetic).
"""
from typing import Callable, List, Tuple, Union

import torch

_MASK32 = 0xFFFFFFFF
_TOP_CODE = 255
_MIN_BASE = 2.0**-126
# 2^(-k/16), k = 0..15, rounded to nearest float32: codec.h's scale_step, the same literals.
_SCALE_STEPS = [float.fromhex(h) for h in (
    '0x1p+0', '0x1.ea4afap-1', '0x1.d5818ep-1', '0x1.c199bep-1',
    '0x1.ae89fap-1', '0x1.9c4918p-1', '0x1.8ace54p-1', '0x1.7a1148p-1',
    '0x1.6a09e6p-1', '0x1.5ab07ep-1', '0x1.4bfdaep-1', '0x1.3dea64p-1',
    '0x1.306fe0p-1', '0x1.2387a6p-1', '0x1.172b84p-1', '0x1.0b5586p-1')]

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


def _bits_float(u: torch.Tensor) -> torch.Tensor:
    u = u & _MASK32
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def scale_factor(e: torch.Tensor) -> torch.Tensor:
    """2^(-e/16) of int64 scale codes: a table entry times an exact power of two."""
    steps = torch.tensor(_SCALE_STEPS, dtype=torch.float32, device=e.device)
    return steps[e & 15] * _bits_float((127 - (e >> 4)) << 23)


Grid = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # min, step, base: codec.h's SampleGrid


def sample_grid(mn: torch.Tensor, rng: torch.Tensor, levels: torch.Tensor) -> Grid:
    """The grids of samples of stored min ``mn`` and range ``rng`` at ``levels`` levels."""
    levels_f = levels.to(torch.float32)
    step = rng / float(_TOP_CODE)
    base = torch.where(rng == 0, 1.0, rng / levels_f)
    base = torch.where(base < _MIN_BASE, _MIN_BASE, base)
    while True:
        low = rng * reciprocal(base) > levels_f
        if not bool(low.any()):
            return mn, step, base
        base = torch.where(low, _bits_float(_float_bits(base) + 1), base)


def grid_min(grid: Grid, code: torch.Tensor) -> torch.Tensor:
    """Stored min of (N, ...) min codes on the grids of N samples."""
    mn, step, _ = (t.view(-1, *[1] * (code.dim() - 1)) for t in grid)
    return mn + code.to(torch.float32) * step


def grid_scale(grid: Grid, code: torch.Tensor) -> torch.Tensor:
    """Stored scale of (N, ...) scale codes on the grids of N samples."""
    base = grid[2].view(-1, *[1] * (code.dim() - 1))
    return base * scale_factor(code)


def sample_stats(lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(N, 2) stored min and range of samples from their groups' (N, groups) mins and maxes."""
    if lo.shape[1] == 0:
        return torch.zeros(lo.shape[0], 2, device=lo.device)
    mn = lo.amin(dim=1) + 0.0  # -0 -> +0, as in codec.h
    rng = (hi.amax(dim=1) - mn) + 0.0
    base = sample_grid(mn, rng, levels)[2]
    finite = torch.isfinite(mn) & torch.isfinite(rng) & torch.isfinite(base)
    return torch.where(finite[:, None], torch.stack([mn, rng], dim=1), float('nan'))


def _largest_code(holds: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The largest code in [0, 255] for which ``holds`` (true on a prefix of the codes) is true, or
    0 where it is true for none, by bisection."""
    code = torch.zeros_like(like, dtype=torch.int64)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        code = torch.where(holds(code + step), code + step, code)
    return code


def group_codes(grid: Grid, lo: torch.Tensor, hi: torch.Tensor,
                levels: torch.Tensor) -> torch.Tensor:
    """(N, groups, 2) int64 min and scale codes of groups of (N, groups) range [lo, hi]."""
    min_code = _largest_code(lambda c: grid_min(grid, c) <= lo, lo)
    span = hi - grid_min(grid, min_code)
    top = levels.to(torch.float32)[:, None]
    scale_code = _largest_code(lambda e: span * reciprocal(grid_scale(grid, e)) <= top, lo)
    return torch.stack([min_code, scale_code], dim=2)


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
             seed: int, stochastic: bool,
             total_bytes: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, m = x.shape
    device = x.device
    xf = x.to(torch.float32)
    levels = (1 << bits.to(torch.int64)) - 1                      # (N,)
    lo = _groupwise(xf, group_size, float('inf')).amin(dim=2)
    hi = _groupwise(xf, group_size, float('-inf')).amax(dim=2)
    # A group is never all padding, so a group min/max of +-inf comes from the input.
    sample_meta = sample_stats(lo, hi, levels)
    grid = sample_grid(sample_meta[:, 0], sample_meta[:, 1], levels)
    codes = group_codes(grid, lo, hi, levels)
    meta = codes.reshape(-1, 2).to(torch.uint8)

    mn = _per_element(grid_min(grid, codes[..., 0]), group_size, m)
    inv_scale = _per_element(reciprocal(grid_scale(grid, codes[..., 1])), group_size, m)
    if stochastic:
        index = torch.arange(n * m, dtype=torch.int64, device=device).view(n, m)
        u = uniform(rng_key(seed), index)
    else:
        u = torch.full((n, m), 0.5, device=device)
    level = torch.floor((xf - mn) * inv_scale + u)
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
    return data, meta, sample_meta


def dequantize_transposed(data: torch.Tensor, meta: torch.Tensor, sample_meta: torch.Tensor,
                          bits: torch.Tensor, offsets: torch.Tensor, num_samples: int, rows: int,
                          cols: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    values = dequantize(data, meta, sample_meta, bits, offsets, num_samples, rows * cols,
                        group_size, dtype)
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


def stored_params(meta: torch.Tensor, sample_meta: torch.Tensor, bits: torch.Tensor,
                  num_samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, groups) float32 stored min and scale of each group of a compressed tensor."""
    codes = meta.to(torch.int64).view(num_samples, -1, 2)
    grid = sample_grid(sample_meta[:, 0], sample_meta[:, 1], (1 << bits.to(torch.int64)) - 1)
    return grid_min(grid, codes[..., 0]), grid_scale(grid, codes[..., 1])


def dequantize(data: torch.Tensor, meta: torch.Tensor, sample_meta: torch.Tensor,
               bits: torch.Tensor, offsets: torch.Tensor, num_samples: int, sample_size: int,
               group_size: int, dtype: torch.dtype) -> torch.Tensor:
    n, m = num_samples, sample_size
    device = data.device
    out = torch.empty(n, m, dtype=dtype, device=device)
    if n * m == 0:
        return out
    group_min, group_scale = stored_params(meta, sample_meta, bits, n)
    mn = _per_element(group_min, group_size, m)
    scale = _per_element(group_scale, group_size, m)
    j = torch.arange(m, dtype=torch.int64, device=device)
    for b in bits.unique().tolist():
        rows = (bits == b).nonzero().flatten()
        byte = data[offsets[rows][:, None] + (j * b >> 3)].to(torch.int64)
        level = (byte >> (j * b & 7)) & ((1 << b) - 1)
        out[rows] = (mn[rows] + level.to(torch.float32) * scale[rows]).to(dtype)
    return out
