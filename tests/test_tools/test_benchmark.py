"""tools/benchmark.py: maxbatch (the search, the report, real probes in subprocesses) and the
memory study of each model family (reduced models, in this process)."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import benchmark
from test_layers.qchecks import settings


def maxbatch_args(**overrides):
    args = dict(budget=512, image_size=32, methods=['FP32', 'L3'], start=8, max_batch=1024,
                tolerance=0.0)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.fixture
def fake_probes(monkeypatch):
    """Probes without subprocesses: a method fits up to a fixed batch; records what was tried."""
    limits = {'FP32': 37, 'L3': 300}
    tried = []

    def probe(method, batch, args):
        tried.append((method, batch))
        oom = batch > limits[method]
        return {'batch': batch, 'oom': oom, 'peak_bytes': batch * 2**20,
                'images_per_second': None if oom else 10.0 + batch / 100}

    monkeypatch.setattr(benchmark, '_probe_batch', probe)
    return tried


def test_search_doubles_then_bisects(fake_probes):
    result = benchmark._search_max_batch('FP32', maxbatch_args())
    assert [batch for _, batch in fake_probes] == [8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert (result['max_batch'], result['first_oom']) == (37, 38)
    assert [r['batch'] for r in result['tried']] == sorted(batch for _, batch in fake_probes)
    assert result['images_per_second'] == pytest.approx(10.37)


def test_search_stops_within_tolerance_and_reports_a_start_out_of_memory(fake_probes):
    result = benchmark._search_max_batch('L3', maxbatch_args(tolerance=0.1))
    assert result['max_batch'] <= 300 < result['first_oom'] <= 1.1 * result['max_batch']
    assert benchmark._search_max_batch('FP32', maxbatch_args(start=64))['max_batch'] == 0


def test_maxbatch_saves_table_json_and_plot(fake_probes, out_dir, capsys):
    result = benchmark.maxbatch(maxbatch_args())
    assert [r['max_batch'] for r in result['rows']] == [37, 300]
    table = capsys.readouterr().out
    assert '8.11x' in table  # 300 / 37
    assert json.loads((out_dir / 'maxbatch.json').read_text())['rows'][1]['method'] == 'L3'
    assert (out_dir / 'maxbatch.png').stat().st_size > 0


def test_probe_in_a_subprocess():
    result = benchmark._probe_batch('L3', 2, maxbatch_args())
    assert result['batch'] == 2 and not result['oom'] and result['images_per_second'] > 0
    assert 0 < result['peak_bytes'] < 512 * 2**20


@pytest.mark.slow
def test_maxbatch_command_tiny_run(tmp_path):
    """The command end to end, results under the working directory's work_dirs/bench/."""
    cmd = [sys.executable, os.path.abspath(benchmark.__file__), 'maxbatch', '--budget', '64',
           '--image-size', '32', '--methods', 'FP32', 'L3', '--start', '8', '--tolerance', '0.5']
    out = subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    result = json.loads((tmp_path / 'work_dirs' / 'bench' / 'maxbatch.json').read_text())
    fp32, l3 = (row['max_batch'] for row in result['rows'])
    assert 0 < fp32 < l3, out
    assert (tmp_path / 'work_dirs' / 'bench' / 'maxbatch.png').exists()


# Each model family of the memory study, made small (narrow, shallow, ResNet-18 for the presets)
# so that a probe takes seconds: the study's own configs underneath, builders, batch makers, data
# preprocessors and losses. (config override, batch, image size)
SMALL = {
    'vit-b16': ("model = dict(backbone=dict(arch=dict(_delete_=True, embed_dims=64, num_layers=2, "
                "num_heads=2, feedforward_channels=256)), head=dict(in_channels=64))", 2, 224),
    'swin-t': ("model = dict(backbone=dict(arch=dict(_delete_=True, embed_dims=32, "
               "depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])), head=dict(in_channels=256))",
               2, 224),
    'faster-rcnn': ("model = dict(backbone=dict(depth=18), "
                    "neck=dict(in_channels=[64, 128, 256, 512]))", 1, 128),
    'fcn': ("model = dict(backbone=dict(depth=18), decode_head=dict(in_channels=512, channels=64), "
            "auxiliary_head=dict(in_channels=256, channels=32))", 1, 64),
    'mocov2': ("model = dict(backbone=dict(depth=18), queue_len=4096, "
               "neck=dict(in_channels=512, hid_channels=512))", 2, 64),
}


@pytest.fixture
def small_models(tmp_path, monkeypatch):
    """BENCH_MODELS with the SMALL variants: configs inheriting the study's. One intra-op
    thread (conftest restores the count): OpenMP barriers on a busy 2-core machine make each
    small op take milliseconds."""
    torch.set_num_threads(1)
    for name, (override, _, _) in SMALL.items():
        config = benchmark.BENCH_MODELS[name].config
        base = config if '::' in config else os.path.join(benchmark.REPO, config)
        path = tmp_path / f'{name}.py'
        path.write_text(f"_base_ = '{base}'\n{override}\n")
        monkeypatch.setitem(benchmark.BENCH_MODELS, name,
                            dataclasses.replace(benchmark.BENCH_MODELS[name], config=str(path)))


@pytest.mark.parametrize('name', sorted(SMALL))
def test_memory_probe_compresses_each_model_family(name, small_models):
    _, batch, size = SMALL[name]
    with settings('L3'):  # the probe sets the level: restore the config after
        fp32, l3 = (benchmark.measure_memory(name, method, batch, size)
                    for method in ('FP32', 'L3'))
    assert fp32['generic_bytes'] == 0 and fp32['counted_bytes'] > 0
    assert l3['counted_bytes'] < fp32['counted_bytes'] / 4
    # Generic mode ran (the counter did not shadow it) and its bytes are counted.
    assert l3['counted_bytes'] >= l3['generic_bytes'] + sum(l3['generic_kept_bytes'].values())
    if name in ('vit-b16', 'swin-t'):  # attention: compressed in generic mode only
        assert l3['generic_bytes'] > 0.1 * l3['counted_bytes']


def test_amp_through_an_op_without_bfloat16_cpu_kernel_is_unsupported(small_models):
    amp = benchmark.measure_memory('faster-rcnn', 'AMP', 1, 64)
    assert amp['unsupported'].startswith('fails in mmcv/ops/nms.py')  # no bfloat16 CPU kernel
    assert benchmark.measure_step_time('faster-rcnn', 'AMP', 1, 64, steps=1) == amp


def test_step_time_probe(small_models):
    _, batch, size = SMALL['fcn']
    with settings('L3'):
        timed = benchmark.measure_step_time('fcn', 'L3', batch, size, steps=2)
    assert set(timed) == {'method', 'step_seconds', 'load_average'}
    assert timed['method'] == 'L3' and timed['step_seconds'] > 0


def test_memory_table_and_json_per_model(out_dir, monkeypatch, capsys):
    def probe(method, args, timing=False):
        if method == 'CP':
            return {'method': 'CP', 'unsupported': 'VisionTransformer takes no with_cp'}
        if timing:
            return {'method': method, 'step_seconds': 3.0 if method == 'L3' else 2.0,
                    'load_average': 1.0}
        scale = {'FP32': 8, 'L3': 1}[method]
        return {'method': method, 'rss_bytes': scale * 2**20, 'counted_bytes': scale * 2**20,
                'generic_bytes': 2**19 if method == 'L3' else 0, 'generic_kept_bytes': {}}

    monkeypatch.setattr(benchmark, '_run_memory_probe', probe)
    args = argparse.Namespace(model='vit-b16', batch=None, image_size=None, steps=1,
                              methods=['FP32', 'CP', 'L3'])
    result = benchmark.memory(args)
    table = capsys.readouterr().out
    assert 'batch 16, 224x224' in table and 'takes no with_cp' in table
    assert '8.00x' in table and '1.50x' in table  # memory and step-time ratios to FP32
    saved = json.loads((out_dir / 'memory_vit-b16.json').read_text())
    assert saved == result and [r['method'] for r in saved['rows']] == ['FP32', 'CP', 'L3']


def test_memory_probe_in_a_subprocess_reports_checkpointing_unsupported():
    args = argparse.Namespace(model='vit-b16', batch=1, image_size=32, steps=1)
    assert benchmark._run_memory_probe('CP', args) == {
        'method': 'CP', 'unsupported': 'VisionTransformer takes no with_cp'}
