"""tools/benchmark.py: maxbatch (the search, the report, real probes in subprocesses), the
memory study of each model family (reduced models, in this process) with mmengine's own memory
savers, the pareto study, and the gpu study (its logic on the CPU, its measurements on CUDA)."""
import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import benchmark
from test_layers.qchecks import settings

# For the tests whose probes run in subprocesses: there conftest cannot tell a missing package.
needs_openmmlab = pytest.mark.skipif(not importlib.util.find_spec('mmpretrain'),
                                     reason='the probes need mmpretrain')


def maxbatch_args(**overrides):
    args = dict(budget=512, image_size=32, methods=['FP32', 'L3'], start=8, max_batch=1024,
                tolerance=0.0)
    args.update(overrides)
    return argparse.Namespace(**args)


LIMITS = {'FP32': 37, 'L3': 300}


def fake_probe(method, batch, args=None):
    """A method fits up to LIMITS[method]."""
    oom = batch > LIMITS[method]
    return {'batch': batch, 'oom': oom, 'peak_bytes': batch * 2**20,
            'images_per_second': None if oom else 10.0 + batch / 100}


@pytest.fixture
def fake_probes(monkeypatch):
    """Probes without subprocesses; records what was tried."""
    tried = []

    def probe(method, batch, args):
        tried.append((method, batch))
        return fake_probe(method, batch)

    monkeypatch.setattr(benchmark, '_probe_batch', probe)
    return tried


def search(method, start=8, max_batch=1024, tolerance=0.0, growth=2.0, probe=fake_probe):
    tried = []

    def recorded(batch):
        tried.append(batch)
        return probe(method, batch)

    return benchmark._search_max_batch(recorded, start, max_batch, tolerance, growth), tried


def test_search_doubles_then_bisects():
    result, tried = search('FP32')
    assert tried == [8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert (result['max_batch'], result['first_oom'], result['stopped']) == (37, 38, None)
    assert [r['batch'] for r in result['tried']] == sorted(tried)
    assert result['images_per_second'] == pytest.approx(10.37)


def test_search_stops_within_tolerance_shrinks_from_a_start_too_large_and_caps():
    result, _ = search('L3', tolerance=0.1)
    assert result['max_batch'] <= 300 < result['first_oom'] <= 1.1 * result['max_batch']
    result, tried = search('FP32', start=64)
    assert tried[:2] == [64, 32] and result['max_batch'] == 37  # halving, then bisection
    result, tried = search('L3', start=100, growth=1.25, tolerance=0.05)
    assert tried[:6] == [100, 125, 156, 195, 243, 303] and 285 < result['max_batch'] <= 300
    result, tried = search('L3', max_batch=200)
    assert tried[-1] == 200 and (result['max_batch'], result['first_oom']) == (200, None)
    assert search('FP32', start=50, probe=lambda m, b: fake_probe(m, b + 1000))[0][
        'max_batch'] == 0


def test_search_ends_early_when_the_probe_times_out():
    def probe(method, batch):
        if batch > 100:
            raise TimeoutError(f'time limit at {batch}')
        return fake_probe(method, batch)

    result, tried = search('L3', probe=probe)
    assert tried == [8, 16, 32, 64, 128]
    assert (result['max_batch'], result['first_oom']) == (64, None)
    assert result['stopped'] == 'time limit at 128'


def test_maxbatch_saves_table_json_and_plot(fake_probes, out_dir, capsys):
    result = benchmark.maxbatch(maxbatch_args())
    assert [r['max_batch'] for r in result['rows']] == [37, 300]
    table = capsys.readouterr().out
    assert '8.11x' in table  # 300 / 37
    assert json.loads((out_dir / 'maxbatch.json').read_text())['rows'][1]['method'] == 'L3'
    assert (out_dir / 'maxbatch.png').stat().st_size > 0


@needs_openmmlab
def test_probe_in_a_subprocess():
    result = benchmark._probe_batch('L3', 2, maxbatch_args())
    assert result['batch'] == 2 and not result['oom'] and result['images_per_second'] > 0
    assert 0 < result['peak_bytes'] < 512 * 2**20


@needs_openmmlab
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
                'generic_bytes': 2**19 if method == 'L3' else 0, 'generic_kept_bytes': {},
                'peak_bytes': 2 * scale * 2**20, 'untrained_params': 0}

    monkeypatch.setattr(benchmark, '_run_memory_probe', probe)
    args = argparse.Namespace(model='vit-b16', batch=None, image_size=None, steps=1,
                              methods=['FP32', 'CP', 'L3'])
    result = benchmark.memory(args)
    table = capsys.readouterr().out
    assert 'batch 16, 224x224' in table and 'takes no with_cp' in table
    assert '8.00x' in table and '1.50x' in table  # memory and step-time ratios to FP32
    saved = json.loads((out_dir / 'memory_vit-b16.json').read_text())
    assert saved == result and [r['method'] for r in saved['rows']] == ['FP32', 'CP', 'L3']


@needs_openmmlab
def test_memory_probe_in_a_subprocess_reports_checkpointing_unsupported():
    args = argparse.Namespace(model='vit-b16', batch=1, image_size=32, steps=1)
    assert benchmark._run_memory_probe('CP', args) == {
        'method': 'CP', 'unsupported': 'VisionTransformer takes no with_cp'}


def test_method_names():
    assert benchmark._method_parts('FP32') == (None, frozenset())
    assert benchmark._method_parts('L3+AMP') == ('L3', {'AMP'})
    assert benchmark._method_parts('ECBE') == (None, {'ECBE'})
    parts = [benchmark._method_parts(m) for m in benchmark.METHODS]
    assert all(level in benchmark.LEVELS or level is None for level, _ in parts)
    assert set().union(*(extras for _, extras in parts)) == {'AMP', 'CP', 'ACP', 'ECBE'}
    assert benchmark._method_parts('L3@1.5+CP') == ('L3@1.5', {'CP'})


def test_methods_may_name_their_bits():
    import actnn_mm

    for good in ('L3@1.5', 'L3@1.5+CP', 'L2@8', 'FP32', 'L3'):
        assert benchmark.method_spec(good) == good
    for bad in ('L2@1.5', 'L3@1.01', 'L3@x', 'L9@2', 'L3@1.5+XX', 'X'):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark.method_spec(bad)
    with settings('L1'):
        benchmark.method_spec('L3@1.5')
        assert actnn_mm.config.level == 'L1' and actnn_mm.config.bits == 4  # left as it was
        benchmark.set_level('L3@1.5')
        assert actnn_mm.config.level == 'L3' and actnn_mm.config.bits == 1.5


@pytest.mark.parametrize('name', ['vit-b16', 'swin-t', 'faster-rcnn'])
def test_activation_checkpointing_of_each_model_family(name, small_models):
    """mmengine's activation checkpointing of the backbone's stages (blocks for transformers),
    alone and (ViT) with L3."""
    _, batch, size = SMALL[name]
    methods = ('FP32', 'ACP', 'L3', 'L3+ACP') if name == 'vit-b16' else ('FP32', 'ACP')
    with settings('L3'):
        rows = {m: benchmark.measure_memory(name, m, batch, size) for m in methods}
    assert rows['ACP']['counted_bytes'] < rows['FP32']['counted_bytes']
    assert all('peak_bytes' in row for row in rows.values())
    if name == 'vit-b16':
        assert rows['L3+ACP']['counted_bytes'] < rows['L3']['counted_bytes']
    # faster-rcnn: frozen_stages=1, so mmengine's reentrant checkpoint of layer2, whose input
    # needs no gradient, leaves layer2 (and the layers after it) without one.
    assert (rows['ACP']['untrained_params'] > rows['FP32']['untrained_params']) == (
        name == 'faster-rcnn')


def test_efficient_conv_bn_eval_fuses_eval_mode_batchnorms(small_models):
    """ECBE on a detector (norm_eval=True): each convolution and its BatchNorm run as one
    convolution with fused weights; at L3 generic mode compresses what the fused ones save."""
    _, batch, size = SMALL['faster-rcnn']
    model = benchmark._build('faster-rcnn', size, frozenset({'ECBE'}))
    fused = [node for node in model.backbone.forward.__self__.graph.nodes
             if node.name.startswith('efficient_conv_bn_eval')]
    assert len(fused) == 20  # ResNet-18: stem, 16 block convolutions, 3 downsamples
    with settings('L3'):
        rows = {m: benchmark.measure_memory('faster-rcnn', m, batch, size)
                for m in ('ECBE', 'L3+ECBE')}
    assert rows['L3+ECBE']['counted_bytes'] < rows['ECBE']['counted_bytes'] / 4
    assert rows['L3+ECBE']['generic_bytes'] > 0
    fcn = benchmark.measure_memory('fcn', 'ECBE', *SMALL['fcn'][1:])
    assert fcn['unsupported'] == 'ResNetV1c has no eval-mode BatchNorm to fuse (norm_eval=False)'


def test_pareto_front_table_json_and_plot(out_dir, monkeypatch, capsys):
    figures = {'FP32': (8, 2.0), 'AMP': (4, 1.5), 'CP': (3, 3.0), 'L3': (1, 2.5), 'L2': (2, 2.6)}

    def probe(method, args, timing=False):
        if args.model == 'swin-t':
            raise RuntimeError(f'swin-t {method} failed:\nAssertionError: smaller than the window')
        if method == 'ECBE':
            return {'method': method, 'unsupported': 'norm_eval=False'}
        rss, seconds = figures[method]
        if timing:
            return {'method': method, 'step_seconds': seconds, 'load_average': 1.0}
        return {'method': method, 'rss_bytes': rss * 2**20, 'counted_bytes': rss * 2**20,
                'generic_bytes': 0, 'generic_kept_bytes': {}, 'peak_bytes': 2 * rss * 2**20,
                'untrained_params': 5 if method == 'CP' else 0}

    monkeypatch.setattr(benchmark, '_run_memory_probe', probe)
    args = benchmark._parser().parse_args(['pareto', '--models', 'resnet50', 'swin-t', 'fcn',
                                           '--methods', 'FP32', 'AMP', 'CP', 'L2', 'L3', 'ECBE'])
    assert (args.batch, args.image_size, args.steps) == (2, 128, 2)
    result = benchmark.pareto(args)
    out = capsys.readouterr().out
    assert 'Pareto front (activation memory against step time): AMP, L3' in out
    assert 'CP: 5 trainable parameters (elements) got no gradient (FP32: 0)' in out
    assert '16.0' in out  # FP32's peak MiB column
    saved = json.loads((out_dir / 'pareto.json').read_text())
    assert saved == result and list(saved['models']) == ['resnet50', 'fcn']
    # a model that fails even in FP32 is noted, and the others are measured all the same
    assert saved['failed'] == {'swin-t': 'AssertionError: smaller than the window'}
    assert saved['models']['fcn']['front'] == ['AMP', 'L3']
    assert (out_dir / 'pareto.png').stat().st_size > 0
    default = benchmark._parser().parse_args(['pareto'])
    assert 'L3+ECBE' in default.methods and 'L4' not in default.methods


@needs_openmmlab
@pytest.mark.slow
def test_pareto_command_tiny_run(tmp_path):
    """Real probes: mmpretrain's ResNet-50 at 32 px, batch 2."""
    cmd = [sys.executable, os.path.abspath(benchmark.__file__), 'pareto', '--models', 'resnet50',
           '--methods', 'FP32', 'ACP', 'L3', '--batch', '2', '--image-size', '32', '--steps', '1']
    out = subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    result = json.loads((tmp_path / 'work_dirs' / 'bench' / 'pareto.json').read_text())
    rows = {r['method']: r for r in result['models']['resnet50']['rows']}
    assert rows['L3']['rss_bytes'] < rows['FP32']['rss_bytes'], out
    assert rows['ACP']['counted_bytes'] < rows['FP32']['counted_bytes'], out


# The gpu study: its logic on the CPU; the CUDA measurements where there is a GPU.

def test_gpu_command_line():
    args = benchmark._parser().parse_args(['gpu', '--out', 'x', '--time-limit', '170'])
    assert (args.models, args.methods) == (list(benchmark.VISION_MODELS),
                                           list(benchmark.GPU_METHODS))
    assert (args.device, args.budget_gb, args.batch, args.image_size, args.profile) == (
        'cuda', None, 64, 224, False)
    args = benchmark._parser().parse_args(['gpu', '--models', 'vit-b16', '--methods', 'FP32',
                                           'L5', '--budget-gb', '20', '--profile'])
    assert (args.models, args.methods, args.budget_gb, args.out, args.time_limit) == (
        ['vit-b16'], ['FP32', 'L5'], 20.0, benchmark.OUT_DIR, 180.0)
    with pytest.raises(SystemExit):
        benchmark._parser().parse_args(['gpu', '--methods', 'ACP'])


def test_gpu_plan_puts_resnet_fp32_and_l3_first():
    plan = benchmark._gpu_plan(['resnet50', 'vit-b16'], ['FP32', 'AMP', 'L3'], maxbatch=True)
    assert plan == [('resnet50', 'FP32', True), ('resnet50', 'L3', True),
                    ('vit-b16', 'FP32', False), ('vit-b16', 'L3', False),
                    ('resnet50', 'AMP', False), ('vit-b16', 'AMP', False),
                    ('vit-b16', 'FP32', True), ('vit-b16', 'L3', True),
                    ('resnet50', 'AMP', True), ('vit-b16', 'AMP', True)]
    assert benchmark._gpu_plan(['vit-b16'], ['AMP'], maxbatch=False) == [
        ('vit-b16', 'AMP', False)]


def gpu_lines(model, method, search):
    """What a probe of the gpu study prints: L3 keeps 12.5x less, batch 8x larger."""
    l3 = method == 'L3'
    measure = {'phase': 'measure', 'activation_bytes': (8 if l3 else 100) * 2**20,
               'state_bytes': 2**30, 'peak_bytes': 2 * 2**30, 'step_seconds': 0.1,
               'images_per_second': 900.0 if l3 else 1000.0, 'device_name': 'Fake GPU',
               'device_bytes': 80 * 2**30}
    found = {'phase': 'maxbatch', 'method': method, 'budget_bytes': 40 * 2**30,
             'max_batch': 800 if l3 else 100, 'first_oom': 820 if l3 else 103,
             'images_per_second': 880.0 if l3 else 1000.0, 'peak_bytes': 39 * 2**30,
             'stopped': None,
             'tried': [{'batch': 100, 'oom': False, 'peak_bytes': 2**30,
                        'images_per_second': 1000.0}]}
    return [measure, found] if search else [measure]


def test_gpu_study_within_its_time_limit(tmp_path, monkeypatch, capsys):
    """Each process takes 60 s of a 180 s limit: three run, the rest are skipped; the JSON is
    written after each; a process killed at the limit is reported as such."""
    clock = [1000.0]
    calls = []

    def run_script(args, release_freed, timeout=None):
        calls.append((args[args.index('--model') + 1], args[args.index('--method') + 1],
                      '--maxbatch' in args, '--profile-dir' in args, timeout))
        assert args[0] == '_gpu_probe' and not release_freed
        clock[0] += 60
        if len(calls) == 3:
            return None, gpu_lines('vit-b16', 'FP32', False), ''
        return 0, gpu_lines(calls[-1][0], calls[-1][1], '--maxbatch' in args), ''

    monkeypatch.setattr(benchmark, '_run_script', run_script)
    monkeypatch.setattr(benchmark.time, 'time', lambda: clock[0])
    monkeypatch.setattr(benchmark.torch.cuda, 'is_available', lambda: True)
    args = benchmark._parser().parse_args(['gpu', '--out', str(tmp_path), '--methods', 'FP32',
                                           'L3', 'AMP', '--profile'])
    result = benchmark.gpu(args)
    assert [c[:4] for c in calls] == [('resnet50', 'FP32', True, False),
                                      ('resnet50', 'L3', True, True),
                                      ('vit-b16', 'FP32', False, False)]
    assert calls[0][4] == pytest.approx(180 - benchmark._REPORT_SECONDS)
    assert result['skipped'][0] == 'vit-b16 FP32 measurement (killed at the time limit)'
    assert 'vit-b16 L3 measurement' in result['skipped'] and len(result['skipped']) == 8
    saved = json.loads((tmp_path / 'gpu.json').read_text())
    assert saved['device_name'] == 'Fake GPU' and saved['budget_bytes'] == 40 * 2**30
    l3 = saved['models']['resnet50']['rows']['L3']
    assert l3['maxbatch']['max_batch'] == 800 and 'phase' not in l3['measure']
    assert [(t['quantity'], t['met']) for t in saved['targets']] == [
        ('activation_less', True), ('max_batch', True), ('speed_at_max', True),
        ('activation_less', False)]
    out = capsys.readouterr().out
    assert '8 (12.50x)' in out and '800 (8.00x)' in out and '880 (0.88x)' in out
    assert 'not measured' in out  # ViT-B/16's L3
    assert (tmp_path / 'gpu.png').exists() == bool(importlib.util.find_spec('matplotlib'))


def test_gpu_study_reports_a_failed_process_and_plots_without_matplotlib(tmp_path, monkeypatch,
                                                                         capsys):
    def run_script(args, release_freed, timeout=None):
        if 'L3' in args:
            return 1, [], 'Traceback ...\nRuntimeError: CUDA error: an illegal memory access\n'
        return 0, gpu_lines('resnet50', 'FP32', '--maxbatch' in args), ''

    def no_matplotlib():
        raise ImportError('No module named matplotlib')

    monkeypatch.setattr(benchmark, '_run_script', run_script)
    monkeypatch.setattr(benchmark, '_pyplot', no_matplotlib)
    args = benchmark._parser().parse_args(['gpu', '--device', 'cpu', '--budget-gb', '1', '--out',
                                           str(tmp_path), '--models', 'resnet50', '--methods',
                                           'FP32', 'L3'])
    result = benchmark.gpu(args)
    assert result['models']['resnet50']['rows']['L3']['error'] == (
        'RuntimeError: CUDA error: an illegal memory access')
    out = capsys.readouterr().out
    assert 'no plot (No module named matplotlib)' in out and 'illegal memory access' in out
    assert json.loads((tmp_path / 'gpu.json').read_text())['targets'][0]['met'] is False


@pytest.mark.parametrize('method', ['AMP', 'CP', 'L3'])
def test_vision_training_and_probes_on_the_cpu(method):
    """torchvision's ResNet-50 by each kind of method, at 32 px; the search's probe: a size that
    fits, one over the budget, one whose allocation fails."""
    torch.set_num_threads(1)
    device = torch.device('cpu')
    meter = benchmark._meter(device)
    with settings('L3'):
        run = benchmark._vision_training('resnet50', method, 2, 32, device)
        run.init_state()
        measured = benchmark._measure_training(run, meter, 2, warmup=1, steps=1)
        assert measured['images_per_second'] > 0 and measured['peak_bytes'] > 0
        make_loss = functools.partial(benchmark._vision_loss, run.model, image_size=32,
                                      device=device)
        fits = benchmark._probe_vision_batch(run, meter, make_loss, 3, 2**40, 1)
        over = benchmark._probe_vision_batch(run, meter, make_loss, 3, 1, 1)

        def out_of_memory(batch):
            raise torch.cuda.OutOfMemoryError('CUDA out of memory')

        failed = benchmark._probe_vision_batch(run, meter, out_of_memory, 3, 2**40, 1)
    assert not fits['oom'] and fits['images_per_second'] > 0 and fits['batch'] == 3
    assert over['oom'] and failed['oom'] and failed['images_per_second'] is None
    assert run.loss is None
    if method == 'CP':
        assert isinstance(run.model.layer1.forward, functools.partial)
    if method == 'L3':
        assert run.generic is not None and run.model.conv1.__class__.__name__ == 'QConv2d'
    assert run.autocast._enabled == (method == 'AMP')


def test_vit_checkpoints_its_encoder_blocks():
    with settings('L3'):
        run = benchmark._vision_training('vit-b16', 'CP', 1, 32, torch.device('cpu'))
    blocks = list(run.model.encoder.layers)
    assert len(blocks) == 12 and all(isinstance(b.forward, functools.partial) for b in blocks)


def test_gpu_study_end_to_end_on_the_cpu(tmp_path):
    """The command, its probe in a subprocess, a max-batch search capped at 4 and a profile of
    the step: ResNet-50 at L3, 32 px, on the CPU."""
    cmd = [sys.executable, os.path.abspath(benchmark.__file__), 'gpu', '--device', 'cpu',
           '--out', str(tmp_path), '--models', 'resnet50', '--methods', 'L3', '--batch', '2',
           '--image-size', '32', '--warmup', '0', '--steps', '1', '--probe-steps', '1',
           '--budget-gb', '64', '--max-batch', '4', '--time-limit', '120', '--profile']
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1')).stdout
    result = json.loads((tmp_path / 'gpu.json').read_text())
    l3 = result['models']['resnet50']['rows']['L3']
    assert not result['skipped'] and l3['measure']['images_per_second'] > 0, out
    assert (l3['maxbatch']['max_batch'], l3['maxbatch']['first_oom']) == (4, None)
    assert l3['measure']['profile']['kernels'] == 0  # no CUDA kernels on the CPU
    assert (tmp_path / 'profile_resnet50_L3.json.gz').exists()
    assert 'ResNet-50 (torchvision)' in out and 'target' in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_gpu_study_on_cuda(tmp_path):
    """ResNet-50 FP32 and L3 at 64 px under a 4 GiB budget: L3 keeps less and fits more."""
    cmd = [sys.executable, os.path.abspath(benchmark.__file__), 'gpu', '--out', str(tmp_path),
           '--models', 'resnet50', '--methods', 'FP32', 'L3', '--batch', '32', '--image-size',
           '64', '--budget-gb', '4', '--steps', '3', '--time-limit', '120']
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = json.loads((tmp_path / 'gpu.json').read_text())['models']['resnet50']['rows']
    fp32, l3 = rows['FP32'], rows['L3']
    assert l3['measure']['activation_bytes'] < fp32['measure']['activation_bytes'] / 4, out
    assert l3['maxbatch']['max_batch'] > 2 * fp32['maxbatch']['max_batch'], out
    assert fp32['maxbatch']['peak_bytes'] <= 4 * 2**30
