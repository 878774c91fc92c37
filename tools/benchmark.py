"""Benchmarks, each figure measured side by side in one run.

    python tools/benchmark.py codec [--shape 64 64 56 56] [--repeat 5]

Results are printed as a table and saved as JSON under work_dirs/bench/.
"""
import argparse
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch

from actnn_mm.compress import dequantize, extension_loaded, quantize, reference
from actnn_mm.compress.codec import _samples_view

OUT_DIR = os.path.join('work_dirs', 'bench')


def _median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _save(name: str, result: Dict) -> str:
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f'{name}.json')
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    return path


def codec(args: argparse.Namespace) -> Dict:
    """Quantize and dequantize throughput of the kernels and of the reference vs a memory copy."""
    if not extension_loaded():
        raise SystemExit('the C++ extension is not built: run `make install` first')
    torch.manual_seed(0)
    x = torch.randn(*args.shape)
    gb = x.numel() * x.element_size() / 1e9
    copy_out = torch.empty_like(x)
    copy_s = _median_seconds(lambda: copy_out.copy_(x), args.repeat)
    rows: List[Dict] = []
    for bits in (1, 2, 4, 8):
        c = quantize(x, bits)
        samples, _ = _samples_view(x)
        n, m = samples.shape
        ref_args = (c.bits, c.offsets, c.group_size, 0, True, c.data.numel())
        timings = {
            'kernel_quantize': _median_seconds(lambda: quantize(x, bits), args.repeat),
            'kernel_dequantize': _median_seconds(lambda: dequantize(c), args.repeat),
            'reference_quantize': _median_seconds(
                lambda: reference.quantize(samples, *ref_args), args.ref_repeat),
            'reference_dequantize': _median_seconds(
                lambda: reference.dequantize(c.data, c.meta, c.bits, c.offsets, n, m,
                                             c.group_size, x.dtype), args.ref_repeat),
        }
        rows.append({'bits': bits, 'ratio': x.numel() * 4 / c.nbytes,
                     **{k: gb / v for k, v in timings.items()}})
    print(f'codec throughput on {tuple(x.shape)} float32 ({gb * 1e3:.0f} MB), '
          f'{torch.get_num_threads()} threads; GB/s of float32 input (x memory copy)')
    print(f'memory copy: {gb / copy_s:.2f} GB/s')
    header = ['bits', 'compression', 'C++ quantize', 'C++ dequantize', 'ref quantize',
              'ref dequantize', 'C++/ref q', 'C++/ref dq']
    print(' | '.join(f'{h:>14}' for h in header))
    copy_gbs = gb / copy_s
    for r in rows:
        cells = [str(r['bits']), f"{r['ratio']:.2f}x"]
        cells += [f'{r[k]:.2f} ({r[k] / copy_gbs:.2f}x)' for k in
                  ('kernel_quantize', 'kernel_dequantize', 'reference_quantize',
                   'reference_dequantize')]
        cells += [f"{r['kernel_quantize'] / r['reference_quantize']:.0f}x",
                  f"{r['kernel_dequantize'] / r['reference_dequantize']:.0f}x"]
        print(' | '.join(f'{c:>14}' for c in cells))
    result = {'shape': list(x.shape), 'threads': torch.get_num_threads(),
              'copy_gbs': copy_gbs, 'rows': rows}
    print('saved', _save('codec', result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    studies = parser.add_subparsers(dest='study', required=True)
    p = studies.add_parser('codec', help='codec throughput vs the reference and a memory copy')
    p.add_argument('--shape', type=int, nargs='+', default=[64, 64, 56, 56])
    p.add_argument('--repeat', type=int, default=7)
    p.add_argument('--ref-repeat', type=int, default=2)
    p.set_defaults(run=codec)
    args = parser.parse_args()
    args.run(args)


if __name__ == '__main__':
    main()
