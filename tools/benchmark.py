"""Benchmarks, each figure measured side by side in one run.

    python tools/benchmark.py codec  [--shape 64 64 56 56]
    python tools/benchmark.py memory [--batch 16 --image-size 224 --methods FP32 AMP CP L1 L2 L3 L4]

Results are printed as a table and saved as JSON under work_dirs/bench/.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
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
    clone_s = _median_seconds(lambda: x.clone(), args.repeat)  # what an op with a new output pays
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
    print(f'memory copy: {gb / copy_s:.2f} GB/s into an existing tensor, {gb / clone_s:.2f} GB/s '
          f'into a new one (clone)')
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
              'copy_gbs': copy_gbs, 'clone_gbs': gb / clone_s, 'rows': rows}
    print('saved', _save('codec', result))
    return result


def _resnet50(with_cp: bool) -> torch.nn.Module:
    from mmpretrain.registry import MODELS
    return MODELS.build(dict(
        type='ImageClassifier', backbone=dict(type='ResNet', depth=50, with_cp=with_cp),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=2048)))


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class _SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """Counts the unique storages autograd saves, parameters excluded."""

    def __init__(self, params: List[torch.Tensor]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.skip:
                self.storages[ptr] = t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


METHODS = ('FP32', 'AMP', 'CP', 'L0', 'L1', 'L2', 'L3', 'L4', 'L5')


def memory_probe(args: argparse.Namespace) -> None:
    """One method in a fresh process: activation bytes after forward, and step time (JSON out)."""
    import actnn_mm
    from actnn_mm.layers.saved import held_bytes

    torch.manual_seed(0)
    model = _resnet50(with_cp=args.method == 'CP')
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if args.method.startswith('L'):
        actnn_mm.set_optimization_level(args.method)
        actnn_mm.QModule(model)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 1000, (args.batch,))
    device_type = 'cpu'
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.method == 'AMP')

    def forward() -> torch.Tensor:
        with autocast:
            return torch.nn.functional.cross_entropy(model.head(model.extract_feat(x)), y)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        forward().backward()
        optimizer.step()

    step()  # gradients and optimizer state exist from here on
    gc.collect()
    before_rss, before_held = _rss_bytes(), held_bytes()
    counter = _SavedTensorCounter(list(model.parameters()))
    with counter:
        loss = forward()
    after_rss = _rss_bytes()
    counted = counter.nbytes + held_bytes() - before_held
    loss.backward()
    optimizer.step()
    del loss
    print(json.dumps({'method': args.method, 'rss_bytes': after_rss - before_rss,
                      'counted_bytes': counted, 'step_seconds': _median_seconds(step, args.steps)}))


def memory(args: argparse.Namespace) -> Dict:
    """Activation memory after the forward pass and step time of each method, side by side."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')  # freed memory leaves RSS at once
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, '_memory_probe', '--method', method, '--batch',
               str(args.batch), '--image-size', str(args.image_size), '--steps', str(args.steps)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f'  measured {method}', flush=True)
    base = next((r for r in rows if r['method'] == 'FP32'), rows[0])
    print(f'mmpretrain ResNet-50, batch {args.batch}, {args.image_size}x{args.image_size}, '
          f'{torch.get_num_threads()} threads; activation memory held after the forward pass')
    print(f"{'method':>6} | {'RSS MiB':>8} | {'counted MiB':>11} | {'less (RSS)':>10} | "
          f"{'less (counted)':>14} | {'step s':>7} | {'step time':>9}")
    for r in rows:
        print(f"{r['method']:>6} | {r['rss_bytes'] / 2**20:>8.1f} | "
              f"{r['counted_bytes'] / 2**20:>11.1f} | "
              f"{base['rss_bytes'] / max(r['rss_bytes'], 1):>9.2f}x | "
              f"{base['counted_bytes'] / max(r['counted_bytes'], 1):>13.2f}x | "
              f"{r['step_seconds']:>7.2f} | {r['step_seconds'] / base['step_seconds']:>8.2f}x")
    result = {'model': 'resnet50', 'batch': args.batch, 'image_size': args.image_size,
              'rows': rows}
    print('saved', _save('memory', result))
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
    for name, run in (('memory', memory), ('_memory_probe', memory_probe)):
        p = studies.add_parser(name, help='activation memory and step time per method'
                               if name == 'memory' else argparse.SUPPRESS)
        p.add_argument('--batch', type=int, default=16)
        p.add_argument('--image-size', type=int, default=224)
        p.add_argument('--steps', type=int, default=3)
        if name == 'memory':
            p.add_argument('--methods', nargs='+', choices=METHODS,
                           default=['FP32', 'AMP', 'CP', 'L1', 'L2', 'L3', 'L4'])
        else:
            p.add_argument('--method', choices=METHODS, required=True)
        p.set_defaults(run=run)
    args = parser.parse_args()
    args.run(args)


if __name__ == '__main__':
    main()
