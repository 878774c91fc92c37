"""tools/benchmark.py maxbatch: the search, the report, and real probes in subprocesses."""
import argparse
import json
import os
import subprocess
import sys

import pytest

import benchmark


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
