"""tools/fidelity.py detection: loss curves of the demo Faster R-CNN, FP32 vs L3."""
import json
import math

import pytest

import fidelity

ITERS = 16


@pytest.mark.slow
def test_detection_l3_loss_follows_fp32(out_dir):
    """A short version of the study: both levels train on the same batches, their losses are
    finite and fall, and L3's loss over the second half stays near FP32's.

    Measured with these settings, seeds 0-3: the mean loss over iterations 9-16 fell to
    0.36-0.45 of the first half's in FP32 and 0.38-0.60 in L3, and L3's was 0.86, 1.20, 1.09 and
    1.14 times FP32's (seed 0 runs here). A level that stopped learning would stay near its
    initial loss of about 5, over 3 times FP32's.
    """
    result = fidelity.main(['detection', '--iters', str(ITERS), '--window', str(ITERS // 2)])
    assert [row['level'] for row in result['rows']] == ['FP32', 'L3']
    fp32, l3 = (row['runs'][0] for row in result['rows'])
    assert fp32['batches'] == l3['batches'] and len(fp32['batches']) == ITERS
    for run in (fp32, l3):
        for key, values in run['losses'].items():
            assert len(values) == ITERS and all(math.isfinite(v) for v in values), key
        assert run['end_loss'] < 0.7 * run['start_loss'], run['end_loss']
    assert fp32['avg_bits'] is None and 1.5 < l3['avg_bits'] <= 2 + 1e-9  # the budget
    assert abs(l3['end_loss'] / fp32['end_loss'] - 1) < 0.35, (l3['end_loss'], fp32['end_loss'])
    saved = json.loads((out_dir / 'detection.json').read_text())
    assert [row['level'] for row in saved['rows']] == ['FP32', 'L3']
    assert (out_dir / 'detection.png').stat().st_size > 0
