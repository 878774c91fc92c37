"""Every ``torch.ops.actnn_mm`` op, fed wrong arguments, fails with a clear error.

For each op, valid arguments are drawn at random, then one thing is made wrong (a dimension, a
shape, a dtype, contiguity, a device, a size, a bit width, an offset, ...): the call must raise a
RuntimeError or ValueError naming actnn_mm and leave its inputs as they were. Each kind of wrong
argument is tried on several random draws; the draws are seeded, so the test is deterministic.

The values of a compressed stream's widths and offsets are checked on the host where they live
there (the CPU). On CUDA the kernels check them on the device: a failure is a device-side assert,
which ends the process's CUDA context, so those cases run in a child process.
"""
import random
import subprocess
import sys
import textwrap
from typing import Callable, Dict, List, NamedTuple, Optional

import pytest
import torch

from actnn_mm.compress import extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
WIDTHS = (1, 2, 4, 8)
DRAWS = 6  # random valid argument sets per kind of wrong argument
HUGE = 2**62

Args = List[object]
Mutation = Callable[[random.Random, Args], Optional[Args]]


class Case(NamedTuple):
    """An op, a draw of valid arguments, and ways to make them wrong.

    ``host`` mutations are caught on the host by every backend; ``values`` ones make a stream's
    widths or offsets wrong, which only the CPU checks on the host.
    """
    op: str
    valid: Callable[[random.Random, str], Args]
    host: Dict[str, Mutation]
    values: Dict[str, Mutation]


def _op(name: str) -> Callable:
    return getattr(torch.ops.actnn_mm, name)


def _set(args: Args, i: int, value: object) -> Args:
    out = list(args)
    out[i] = value
    return out


def _non_contiguous(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The same values and shape, every other element of a buffer twice as large."""
    if t.numel() < 2:
        return None
    view = torch.stack([t, t], dim=-1)[..., 0]
    return view if not view.is_contiguous() else None


def _fewer_dims(t: torch.Tensor) -> torch.Tensor:
    """t flattened, or a vector's first element as a 0-d tensor."""
    return t.reshape(-1) if t.dim() > 1 else t.reshape(-1)[:1].reshape(())


def _retype(dtypes):
    """A mutation of tensor argument i to one of ``dtypes``."""
    def make(i):
        def mutate(rng, args):
            t = args[i]
            choices = [d for d in dtypes if d != t.dtype]
            return _set(args, i, t.to(rng.choice(choices)))
        return mutate
    return make


def _tensor_mutations(name: str, i: int, bad_dtypes, dims=True) -> Dict[str, Mutation]:
    """Wrong dtype, non-contiguous and (if ``dims``) wrong number of dims of tensor argument i."""
    mutations = {
        f'{name}_dtype': _retype(bad_dtypes)(i),
        f'{name}_non_contiguous': lambda rng, args: (
            None if _non_contiguous(args[i]) is None else _set(args, i, _non_contiguous(args[i]))),
    }
    if dims:
        mutations[f'{name}_more_dims'] = lambda rng, args: _set(args, i, args[i][None])
        mutations[f'{name}_fewer_dims'] = lambda rng, args: _set(args, i, _fewer_dims(args[i]))
    return mutations


def _other_device(i: int) -> Optional[Mutation]:
    """Tensor argument i moved to another device (CPU <-> CUDA), where a GPU is present."""
    if not torch.cuda.is_available():
        return None

    def mutate(rng, args):
        t = args[i]
        return _set(args, i, t.cpu() if t.is_cuda else t.cuda())
    return mutate


def _with_devices(mutations: Dict[str, Mutation], tensors: Dict[str, int]) -> Dict[str, Mutation]:
    out = dict(mutations)
    for name, i in tensors.items():
        moved = _other_device(i)
        if moved is not None:
            out[f'{name}_device'] = moved
    return out


# ---------------------------------------------------------------- the compressed stream's ops


def _stream(rng: random.Random, device: str, n: Optional[int] = None, m: Optional[int] = None):
    """Valid quantize arguments: x, bits, offsets, group_size, seed, stochastic, total_bytes
    (with slack after the last sample at times, as a bit budget leaves)."""
    n = rng.randint(1, 4) if n is None else n
    m = rng.randint(1, 300) if m is None else m
    widths = [rng.choice(WIDTHS) for _ in range(n)]
    offsets = [0]
    for b in widths:
        offsets.append(offsets[-1] + -(-m * b // 8) + rng.choice([0, 0, 3]))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.randn(n, m, generator=gen).to(rng.choice([torch.float32, torch.float16,
                                                       torch.bfloat16]))
    return [x.to(device), torch.tensor(widths, dtype=torch.uint8, device=device),
            torch.tensor(offsets, dtype=torch.int64, device=device), 8 * rng.randint(1, 40),
            rng.randrange(-2**63, 2**63), rng.random() < 0.5, offsets[-1] + rng.choice([0, 5])]


def _quantized(rng: random.Random, device: str, m: Optional[int] = None):
    """Valid dequantize arguments: data, meta, sample_meta, bits, offsets, n, m, group_size,
    dtype."""
    x, bits, offsets, group_size, seed, stochastic, total = _stream(rng, device, m=m)
    data, meta, sample_meta = _op('quantize')(x, bits, offsets, group_size, seed, stochastic,
                                              total)
    return [data, meta, sample_meta, bits, offsets, x.shape[0], x.shape[1], group_size, x.dtype]


def _stream_mutations(bits: int, offsets: int) -> Dict[str, Mutation]:
    """Wrong shapes and dtypes of the bits and offsets tensors (argument indices given)."""
    def shorter(i):
        return lambda rng, args: _set(args, i, args[i][:-1])

    def longer(i):
        return lambda rng, args: _set(args, i, torch.cat([args[i], args[i][-1:]]))

    return {
        **_tensor_mutations('bits', bits, [torch.int32, torch.int64, torch.bool, torch.float32]),
        **_tensor_mutations('offsets', offsets, [torch.int32, torch.uint8, torch.float64]),
        'bits_shorter': shorter(bits), 'bits_longer': longer(bits),
        'offsets_shorter': shorter(offsets), 'offsets_longer': longer(offsets),
    }


def _value_mutations(bits: int, offsets: int,
                     set_total: Callable[[Args, int], Args]) -> Dict[str, Mutation]:
    """Wrong values of a stream's widths and offsets: widths outside {1, 2, 4, 8}; offsets that
    start below 0, decrease, leave a sample too little room or end past the data."""
    def edit(i, change):
        def mutate(rng, args):
            values = args[i].cpu().clone()
            if not change(rng, values, args):
                return None
            return _set(args, i, values.to(args[i].device))
        return mutate

    def bad_width(rng, widths, args):
        widths[rng.randrange(len(widths))] = rng.choice([0, 3, 5, 6, 7, 9, 16, 255])
        return True

    def negative_start(rng, offs, args):
        offs -= rng.randint(1, 9)
        return True

    def decreasing(rng, offs, args):
        i = rng.randrange(len(offs) - 1)
        offs[i + 1] = offs[i] - rng.randint(1, 3)
        return True

    def too_short(rng, offs, args):
        i = rng.randrange(len(offs) - 1)
        m, b = _sample_size(args), int(args[bits][i])
        need = -(-m * b // 8)
        offs[i + 1:] -= int(offs[i + 1] - offs[i]) - need + 1  # one byte short, later ones shift
        return need > 0

    def past_the_end(rng, args):
        last = int(args[offsets][-1])
        if last == 0:
            return None
        return set_total(args, last - 1)

    return {
        'width_not_1_2_4_8': edit(bits, bad_width),
        'offsets_negative': edit(offsets, negative_start),
        'offsets_decreasing': edit(offsets, decreasing),
        'sample_too_short': edit(offsets, too_short),
        'offsets_past_the_data': past_the_end,
    }


def _sample_size(args: Args) -> int:
    """Values per sample of quantize (x's dim 1) or dequantize (its argument) arguments."""
    if isinstance(args[0], torch.Tensor) and args[0].dtype != torch.uint8:
        return args[0].shape[1]
    return args[6] if len(args) == 9 else args[6] * args[7]


FLOATS = [torch.float32, torch.float16, torch.bfloat16]
NOT_FLOATS = [torch.float64, torch.int32, torch.uint8, torch.bool]


def _quantize_case() -> Case:
    host = {
        **_tensor_mutations('x', 0, NOT_FLOATS),
        **_stream_mutations(1, 2),
        'group_size_not_multiple_of_8': lambda rng, args: _set(args, 3, rng.choice([1, 12, 100])),
        'group_size_not_positive': lambda rng, args: _set(args, 3, rng.choice([0, -8, -HUGE])),
        'total_bytes_negative': lambda rng, args: _set(args, 6, rng.choice([-1, -HUGE])),
        'total_bytes_below_one_bit_per_value': lambda rng, args: _set(
            args, 6, args[0].shape[0] * -(-args[0].shape[1] // 8) - 1),
    }
    values = _value_mutations(1, 2, lambda args, size: _set(args, 6, size))
    return Case('quantize', _stream, _with_devices(host, {'bits': 1, 'offsets': 2}), values)


def _transposed(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A contiguous (2, N) copy of an (N, 2) tensor, where that is another shape."""
    return None if t.shape[0] == 2 else t.t().contiguous()


def _dequantize_host_mutations(size_args: Dict[str, Mutation]) -> Dict[str, Mutation]:
    return {
        **_tensor_mutations('data', 0, [torch.int8, torch.int32, torch.float32]),
        **_tensor_mutations('meta', 1, [torch.int8, torch.int16, torch.float32, torch.bfloat16]),
        **_tensor_mutations('sample_meta', 2, [torch.float64, torch.float16, torch.bfloat16,
                                               torch.int32, torch.uint8]),
        **_stream_mutations(3, 4),
        'meta_more_groups': lambda rng, args: _set(args, 1, torch.cat([args[1], args[1][:1]])),
        'meta_fewer_groups': lambda rng, args: _set(args, 1, args[1][1:]),
        'sample_meta_more_samples': lambda rng, args: _set(
            args, 2, torch.cat([args[2], args[2][:1]])),
        'sample_meta_fewer_samples': lambda rng, args: _set(args, 2, args[2][1:]),
        'sample_meta_one_column': lambda rng, args: _set(args, 2, args[2][:, :1].contiguous()),
        'sample_meta_transposed': lambda rng, args: (
            None if _transposed(args[2]) is None else _set(args, 2, _transposed(args[2]))),
        'group_size_not_multiple_of_8': lambda rng, args: _set(args, -2, rng.choice([4, 9, 30])),
        'group_size_not_positive': lambda rng, args: _set(args, -2, rng.choice([0, -16])),
        'dtype_not_float': lambda rng, args: _set(args, -1, rng.choice(NOT_FLOATS)),
        'samples_negative': lambda rng, args: _set(args, 5, -args[5]),
        'data_too_short': lambda rng, args: _set(
            args, 0, args[0][:args[5] * -(-_sample_size(args) // 8) - 1]),
        **size_args,
    }


_DEQUANTIZE_TENSORS = {'data': 0, 'meta': 1, 'sample_meta': 2, 'bits': 3, 'offsets': 4}


def _dequantize_case() -> Case:
    def more_values(rng, args):  # more groups than meta holds
        return _set(args, 6, args[6] + args[7] * rng.randint(1, 3))

    host = _dequantize_host_mutations({
        'sample_size_negative': lambda rng, args: _set(args, 6, -rng.randint(1, 100)),
        'sample_size_huge': lambda rng, args: _set(args, 6, rng.choice([2**40, HUGE])),
        'sample_size_wrong': more_values,
    })
    values = _value_mutations(3, 4, lambda args, size: _set(args, 0, args[0][:size]))
    return Case('dequantize', _quantized, _with_devices(host, _DEQUANTIZE_TENSORS), values)


def _dequantize_transposed_case() -> Case:
    def valid(rng, device):
        rows, cols = rng.randint(1, 20), rng.randint(1, 20)
        *tensors, n, _, group_size, dtype = _quantized(rng, device, rows * cols)
        return [*tensors, n, rows, cols, group_size, dtype]

    host = _dequantize_host_mutations({
        'rows_negative': lambda rng, args: _set(args, 6, -args[6]),
        'cols_negative': lambda rng, args: _set(args, 7, -args[7]),
        'rows_times_cols_overflows': lambda rng, args: _set(_set(args, 6, 2**32), 7, 2**32),
        'rows_times_cols_wrong': lambda rng, args: _set(args, 7, args[7] + args[8]),
    })
    values = _value_mutations(3, 4, lambda args, size: _set(args, 0, args[0][:size]))
    return Case('dequantize_transposed', valid, _with_devices(host, _DEQUANTIZE_TENSORS), values)


# ---------------------------------------------------------------- masks and packing


def _bad_width(rng: random.Random) -> int:
    return rng.choice([0, -1, 3, 5, 6, 7, 9, 16, 2**40, -HUGE])


def _pack_bits_case() -> Case:
    def valid(rng, device):
        bits = rng.choice(WIDTHS)
        values = torch.randint(0, 2**bits, (rng.randint(0, 100),), dtype=torch.uint8)
        return [values.to(device), bits]

    host = {
        **_tensor_mutations('values', 0, [torch.float32, torch.int32, torch.int8], dims=False),
        'bits_not_1_2_4_8': lambda rng, args: _set(args, 1, _bad_width(rng)),
    }
    return Case('pack_bits', valid, host, {})


def _unpack_bits_case() -> Case:
    def valid(rng, device):
        bits = rng.choice(WIDTHS)
        packed = torch.randint(0, 256, (rng.randint(1, 50),), dtype=torch.uint8)
        return [packed.to(device), bits, rng.randint(0, packed.numel() * 8 // bits)]

    host = {
        **_tensor_mutations('packed', 0, [torch.int8, torch.bool, torch.float32], dims=False),
        'bits_not_1_2_4_8': lambda rng, args: _set(args, 1, _bad_width(rng)),
        'numel_negative': lambda rng, args: _set(args, 2, rng.choice([-1, -HUGE])),
        'numel_past_the_data': lambda rng, args: _set(
            args, 2, args[0].numel() * 8 // args[1] + rng.choice([1, 8, HUGE])),
    }
    return Case('unpack_bits', valid, host, {})


def _floats(rng: random.Random, device: str, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(*shape, generator=gen).to(rng.choice(FLOATS)).to(device)


def _pack_positive_case() -> Case:
    host = _tensor_mutations('values', 0, NOT_FLOATS, dims=False)
    return Case('pack_positive', lambda rng, device: [_floats(rng, device, rng.randint(1, 100))],
                host, {})


def _mask_mutations() -> Dict[str, Mutation]:
    return _with_devices({
        **_tensor_mutations('values', 0, NOT_FLOATS, dims=False),
        **_tensor_mutations('mask', 1, [torch.bool, torch.int8, torch.int32], dims=False),
        'mask_too_short': lambda rng, args: _set(args, 1, args[1][:-(-args[0].numel() // 8) - 1]),
    }, {'mask': 1})


def _apply_mask_case() -> Case:
    def valid(rng, device):
        values = _floats(rng, device, rng.randint(1, 100))
        mask = torch.randint(0, 256, (-(-values.numel() // 8),), dtype=torch.uint8)
        return [values, mask.to(device), rng.choice([1.0, 2.5])]

    return Case('apply_mask', valid, _mask_mutations(), {})


def _apply_mask_transposed_case() -> Case:
    def valid(rng, device):
        values = _floats(rng, device, rng.randint(1, 4), rng.randint(1, 20), rng.randint(1, 20))
        mask = torch.randint(0, 256, (-(-values.numel() // 8),), dtype=torch.uint8)
        return [values, mask.to(device), 1.0]

    host = {
        **_mask_mutations(),
        'values_not_3d': lambda rng, args: _set(args, 0, args[0].reshape(-1)),
        'values_4d': lambda rng, args: _set(args, 0, args[0][None]),
    }
    return Case('apply_mask_transposed', valid, host, {})


# ---------------------------------------------------------------- BatchNorm and statistics


def _batch_norm_pair(rng: random.Random, device: str) -> Args:
    rows, channels = rng.randint(1, 40), rng.randint(1, 20)
    grad = _floats(rng, device, rows, channels)
    return [grad, torch.randn(rows, channels).to(grad.dtype).to(device)]


def _batch_norm_mutations(grad: int, xh: int) -> Dict[str, Mutation]:
    def other_dtype(i):
        def mutate(rng, args):
            return _set(args, i, args[i].to(rng.choice([d for d in FLOATS if d != args[i].dtype])))
        return mutate

    return _with_devices({
        **_tensor_mutations('grad', grad, NOT_FLOATS),
        **_tensor_mutations('xh', xh, NOT_FLOATS),
        'grad_other_float_dtype': other_dtype(grad),
        'grad_fewer_rows': lambda rng, args: _set(args, grad, args[grad][1:]),
        'grad_more_channels': lambda rng, args: _set(
            args, grad, torch.cat([args[grad], args[grad][:, :1]], dim=1)),
    }, {'grad': grad})


def _batch_norm_sums_case() -> Case:
    return Case('batch_norm_sums', _batch_norm_pair, _batch_norm_mutations(0, 1), {})


def _batch_norm_combine_case() -> Case:
    def valid(rng, device):
        grad, xh = _batch_norm_pair(rng, device)
        return [xh, grad, torch.randn(3, xh.shape[1], device=device)]

    host = {
        **_batch_norm_mutations(1, 0),
        **_tensor_mutations('coef', 2, [torch.float64, torch.float16, torch.int32]),
        'coef_two_rows': lambda rng, args: _set(args, 2, args[2][:2]),
        'coef_more_channels': lambda rng, args: _set(args, 2, torch.cat([args[2]] * 2, dim=1)),
    }
    return Case('batch_norm_combine', valid, _with_devices(host, {'coef': 2}), {})


def _row_stats_input(rng: random.Random, device: str) -> torch.Tensor:
    return _floats(rng, device, rng.randint(1, 6), rng.randint(1, 500))


def _mean_square_range_case() -> Case:
    def valid(rng, device):
        return [_row_stats_input(rng, device), rng.choice([8, 32, 256, HUGE]),
                rng.choice([1, 4, 64, HUGE])]

    host = {
        **_tensor_mutations('x', 0, NOT_FLOATS),
        'group_size_not_positive': lambda rng, args: _set(args, 1, rng.choice([0, -8, -HUGE])),
        'max_groups_not_positive': lambda rng, args: _set(args, 2, rng.choice([0, -1, -HUGE])),
    }
    return Case('mean_square_range', valid, host, {})


def _sum_of_squares_case() -> Case:
    def valid(rng, device):
        blocks = rng.choice([1, 3, 16])
        return [_row_stats_input(rng, device), blocks * rng.choice([1, 7, 100]), blocks]

    host = {
        **_tensor_mutations('x', 0, NOT_FLOATS),
        'blocks_not_positive': lambda rng, args: _set(args, 2, rng.choice([0, -1, -HUGE])),
        'max_values_below_blocks': lambda rng, args: _set(args, 1, args[2] - 1),
    }
    return Case('sum_of_squares', valid, host, {})


# ---------------------------------------------------------------- max pooling's windows


def _window_geometry(rng: random.Random) -> Args:
    kernel = [rng.randint(1, 4), rng.randint(1, 4)]
    return [rng.randint(5, 30), kernel, [rng.randint(1, 3), rng.randint(1, 3)],
            [rng.randint(0, kernel[0] // 2), rng.randint(0, kernel[1] // 2)],
            [rng.randint(1, 2), rng.randint(1, 2)]]


def _geometry_mutations(first: int) -> Dict[str, Mutation]:
    """Wrong width, kernel, stride, padding, dilation (arguments first .. first + 4)."""
    def pair(i, bad):
        def mutate(rng, args):
            values = list(args[i])
            values[rng.randrange(2)] = rng.choice(bad)
            return _set(args, i, values)
        return mutate

    def length(i):
        return lambda rng, args: _set(args, i, rng.choice([[], args[i][:1], args[i] + [1]]))

    mutations = {'width_not_positive': lambda rng, args: _set(args, first, rng.choice([0, -5])),
                 'width_huge': lambda rng, args: _set(args, first, rng.choice([2**31, HUGE]))}
    for k, name in enumerate(['kernel', 'stride', 'padding', 'dilation']):
        i = first + 1 + k
        mutations[f'{name}_not_a_pair'] = length(i)
        mutations[f'{name}_bad'] = pair(i, [-1, -HUGE] if name == 'padding' else [0, -1, -HUGE])
        mutations[f'{name}_huge'] = pair(i, [2**31, HUGE])
    return mutations


def _window_offsets_case() -> Case:
    def valid(rng, device):
        indices = torch.randint(0, 100, (rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 5),
                                         rng.randint(1, 3)))
        return [indices.to(device), *_window_geometry(rng), rng.choice([torch.uint8, torch.int32])]

    host = {
        **_tensor_mutations('indices', 0, [torch.int32, torch.float32, torch.uint8]),
        **_geometry_mutations(1),
        'dtype_not_uint8_int32': lambda rng, args: _set(
            args, 6, rng.choice([torch.int64, torch.float32, torch.int16, torch.bool])),
        'uint8_for_a_window_over_256': lambda rng, args: _set(
            _set(args, 2, rng.choice([[17, 17], [1, 257], [HUGE, HUGE]])), 6, torch.uint8),
    }
    return Case('window_offsets', valid, host, {})


def _window_indices_case() -> Case:
    def valid(rng, device):
        offsets = torch.randint(0, 4, (rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 5),
                                       rng.randint(1, 3)))
        return [offsets.to(rng.choice([torch.uint8, torch.int32])).to(device),
                *_window_geometry(rng)]

    host = {
        **_tensor_mutations('offsets', 0, [torch.int64, torch.float32, torch.int16]),
        **_geometry_mutations(1),
    }
    return Case('window_indices', valid, host, {})


CASES = [_quantize_case(), _dequantize_case(), _dequantize_transposed_case(), _pack_bits_case(),
         _unpack_bits_case(), _pack_positive_case(), _apply_mask_case(),
         _apply_mask_transposed_case(), _batch_norm_sums_case(), _batch_norm_combine_case(),
         _mean_square_range_case(), _sum_of_squares_case(), _window_offsets_case(),
         _window_indices_case()]


def test_every_op_is_fuzzed():
    schemas = {s.name.split('::')[1] for s in torch._C._jit_get_all_schemas()
               if s.name.startswith('actnn_mm::')}
    assert schemas == {case.op for case in CASES}


def _snapshot(args: Args) -> List[object]:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _unchanged(args: Args, before: List[object]) -> bool:
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else True
               for a, b in zip(args, before))


def _fuzz(case: Case, device: str, mutations: Dict[str, Mutation], seed: int) -> int:
    """Calls the op with each mutation of DRAWS valid draws; returns how many calls were made."""
    rng = random.Random(seed)
    calls = 0
    for name, mutate in sorted(mutations.items()):
        for _ in range(DRAWS):
            bad = mutate(rng, case.valid(rng, device))
            if bad is None:
                continue
            before = _snapshot(bad)
            # a wrong sample_meta is named (a check that missed it would fail later, or not)
            match = 'actnn_mm: sample_meta' if name.startswith('sample_meta') else 'actnn_mm'
            with pytest.raises((RuntimeError, ValueError), match=match) as info:
                _op(case.op)(*bad)
            assert _unchanged(bad, before), (name, info.value)
            calls += 1
    return calls


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', CASES, ids=[case.op for case in CASES])
def test_valid_arguments_pass(case, device):
    rng = random.Random(0)
    for _ in range(DRAWS):
        _op(case.op)(*case.valid(rng, device))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', CASES, ids=[case.op for case in CASES])
def test_wrong_arguments_raise(case, device):
    assert _fuzz(case, device, case.host, seed=1) > 0


@pytest.mark.parametrize('case', [c for c in CASES if c.values], ids=lambda c: c.op)
def test_wrong_stream_values_raise_on_the_cpu(case):
    assert _fuzz(case, 'cpu', case.values, seed=2) > 0


def test_extreme_valid_sizes_match_the_reference():
    # a group far larger than the sample, and statistics' sampling plans at the int64 limit
    from actnn_mm.compress import reference

    x = torch.randn(3, 100)
    bits = torch.tensor([1, 2, 8], dtype=torch.uint8)
    offsets = torch.tensor([0, 13, 38, 138])
    got = _op('quantize')(x, bits, offsets, HUGE, 5, True, 140)
    want = reference.quantize(x, bits, offsets, 104, 5, True, 140)  # the same single group
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not got[0][138:].any()  # slack after the last sample is zero
    y = _op('dequantize')(*got, bits, offsets, 3, 100, HUGE, torch.float32)
    assert torch.equal(y, reference.dequantize(*want, bits, offsets, 3, 100, 104, torch.float32))
    for group_size, max_groups in [(8, HUGE), (HUGE, 1), (2**61, 2**62)]:
        torch.testing.assert_close(_op('mean_square_range')(x, group_size, max_groups),
                                   reference.mean_square_range(x, group_size, max_groups),
                                   rtol=1e-9, atol=0)
    torch.testing.assert_close(_op('sum_of_squares')(x, HUGE, HUGE),
                               reference.sum_of_squares(x, HUGE, HUGE), rtol=1e-5, atol=0)


# A child process: a device-side assert leaves its CUDA context unusable.
_CUDA_STREAM_CHECK = textwrap.dedent('''
    import sys
    import torch
    import actnn_mm.compress  # registers the ops
    op, case = sys.argv[1], sys.argv[2]
    x = torch.randn(2, 100, device='cuda')
    bits = torch.tensor([2, 2], dtype=torch.uint8, device='cuda')
    offsets = torch.tensor([0, 25, 50], device='cuda')
    data, meta, sample_meta = torch.ops.actnn_mm.quantize(x, bits, offsets, 64, 0, True, 50)
    if case == 'width':
        bits = torch.tensor([2, 3], dtype=torch.uint8, device='cuda')
    elif case == 'short':
        offsets = torch.tensor([0, 24, 50], device='cuda')
    else:
        offsets = torch.tensor([0, 25, 51], device='cuda')
    if op == 'quantize':
        torch.ops.actnn_mm.quantize(x, bits, offsets, 64, 0, True, 50)
    elif op == 'dequantize':
        torch.ops.actnn_mm.dequantize(data, meta, sample_meta, bits, offsets, 2, 100, 64,
                                      torch.float32)
    else:
        torch.ops.actnn_mm.dequantize_transposed(data, meta, sample_meta, bits, offsets, 2, 10,
                                                 10, 64, torch.float32)
    torch.cuda.synchronize()
''')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('op', ['quantize', 'dequantize', 'dequantize_transposed'])
@pytest.mark.parametrize('case', ['width', 'short', 'past_the_end'])
def test_wrong_stream_values_assert_on_the_device(op, case):
    result = subprocess.run([sys.executable, '-c', _CUDA_STREAM_CHECK, op, case],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'device-side assert' in result.stderr or 'bad bit width' in result.stderr, \
        result.stderr[-2000:]
