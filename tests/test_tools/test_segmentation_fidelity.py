"""tools/fidelity.py segmentation: loss curves of the FCN and Semantic FPN presets on demo
Cityscapes data, FP32 vs L3 vs L3 at a 1.5-bit budget."""
import argparse
import json
import math

import pytest

import actnn_mm
import fidelity

LEVELS = ['FP32', 'L3', 'L3@1.5']
ITERS = 12


def _budget(level):
    """The average bits per value, group statistics included, that ``level`` allows."""
    with fidelity._config_restored():
        fidelity.set_level(level)
        return actnn_mm.config.activation_compression_bits[0]


def _runs(result):
    """(model, level, run) of every run of a segmentation result."""
    return [(curves['model'], row['level'], run) for curves in result['models']
            for row in curves['rows'] for run in row['runs']]


def test_levels_become_the_configs_actnn_key():
    assert fidelity.actnn_key('FP32') is None
    assert fidelity.actnn_key('L3') == dict(level='L3')
    assert fidelity.actnn_key('L3@1.5') == dict(level='L3', activation_compression_bits=[1.5])
    assert fidelity.actnn_key('L3@1.5-nogeneric') == dict(
        level='L3', activation_compression_bits=[1.5], generic=False)
    for text in ('FP32', 'L2', 'L3@1.5', 'L3-nogeneric', 'L4@1.5-nogeneric'):
        assert fidelity.preset_level(text) == text
    for text in ('L2-nogeneric', 'FP32@2', 'L3@x', 'L9', 'FP32-nogeneric'):
        with pytest.raises(argparse.ArgumentTypeError):
            fidelity.preset_level(text)


def test_segmentation_machinery(out_dir):
    """Both presets, every level, one seed, 12 iterations on 32x64 images (about 1.5 minutes):
    the levels see the same batches, every loss is finite and falls, L3@1.5 reaches the config
    and trains at a 1.5-bit budget (L3 at 2), the JSON and the plot are written.

    Measured with these settings (seed 0): the loss over the last 4 iterations was 0.50-0.51
    of that over the first 4 for FCN and 0.43-0.44 for Semantic FPN, at every level; the last
    step's bits (average + group statistics) were 1.99-2.00 + 0.07 at L3 (a budget of 2.0625)
    and 1.43 + 0.07 at L3@1.5.
    """
    result = fidelity.main(['segmentation', '--levels', *LEVELS, '--seeds', '0',
                            '--iters', str(ITERS), '--window', '4', '--images', '4',
                            '--image-size', '64'])
    assert [curves['model'] for curves in result['models']] == ['fcn', 'fpn']
    for curves in result['models']:
        assert [row['level'] for row in curves['rows']] == LEVELS
        batches = [row['runs'][0]['batches'] for row in curves['rows']]
        assert len(batches[0]) == ITERS and all(b == batches[0] for b in batches)
    for model, level, run in _runs(result):
        assert {'loss', 'decode.loss_ce'} <= set(run['losses']), model
        for key, values in run['losses'].items():
            assert len(values) == ITERS and all(math.isfinite(v) for v in values), (model, key)
        assert run['end_loss'] < 0.7 * run['start_loss'], (model, level, run['end_loss'])
        assert run['end_decode.loss_ce'] < 0.7 * run['start_decode.loss_ce'], (model, level)
        assert run['actnn'] == fidelity.actnn_key(level)
        if level == 'FP32':
            assert run['avg_bits'] is None and run['statistics_bits'] is None
        else:  # the average bits plus their group statistics: the budget, at most
            budget = _budget(level)
            total = run['avg_bits'] + run['statistics_bits']
            assert budget - 0.1 < total <= budget + 1e-6, (model, level, run['avg_bits'],
                                                            run['statistics_bits'])
    saved = json.loads((out_dir / 'segmentation.json').read_text())
    assert [curves['model'] for curves in saved['models']] == ['fcn', 'fpn']
    assert saved['models'][0]['rows'][2]['runs'][0]['actnn'] == dict(
        level='L3', activation_compression_bits=[1.5])
    assert (out_dir / 'segmentation.png').stat().st_size > 0


# Relative tolerance of the slow test's end losses (mean of 3 seeds) against FP32's; per seed,
# twice that. FP32's own end loss spreads over seeds by a standard deviation of 6% of its mean
# (Semantic FPN: 0.142, 0.147, 0.159; FCN: 0.3%), so two 3-seed means of equally good levels
# differ by a standard error of about 5%: 10% is two of them. Measured (2026-12-07): L3 +0.7%
# (FCN) and +3.8% (FPN), L3@1.5 +1.5% and +6.0%; per seed at most 8.3%. (With the library of the
# morning, whose L3 budget was 2 bits with the statistics: L3 +0.7% and +1.9%, L3@1.5 +1.2% and
# -0.7%.) A level that stopped learning stays near its start loss, 9 to 10 times the end.
END_TOLERANCE = 0.1


@pytest.mark.slow
def test_segmentation_l3_and_1_5_bits_follow_fp32(out_dir):
    """The study with its defaults (both presets, FP32 / L3 / L3@1.5, seeds 0-2, 60 iterations:
    19-22 minutes on this machine's 2 busy cores): per preset, the end loss of L3 and of L3@1.5,
    averaged over the seeds, within END_TOLERANCE (relative) of FP32's, and per seed within
    2 x END_TOLERANCE of the same seed's FP32 run.
    """
    result = fidelity.main(['segmentation'])
    for curves in result['models']:
        fp32, *compressed = curves['rows']
        assert fp32['level'] == 'FP32' and len(fp32['runs']) == 3
        for row in compressed:
            mean = row['mean']['end_loss'] / fp32['mean']['end_loss'] - 1
            assert abs(mean) < END_TOLERANCE, (curves['model'], row['level'], mean)
            assert max(map(abs, row['relative_gap'])) < 2 * END_TOLERANCE, (
                curves['model'], row['level'], row['relative_gap'])
