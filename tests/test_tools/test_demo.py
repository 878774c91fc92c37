"""tools/demo.py (`make demo`), shortened to two iterations per run."""
import os
import re
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    'tools', 'demo.py')


def test_demo_trains_fp32_and_l3_on_the_same_batches(tmp_path):
    out = subprocess.run(
        [sys.executable, DEMO, '--iters', '2', '--window', '1',
         '--work-dir', str(tmp_path)], check=True, capture_output=True, text=True).stdout
    assert 'Both runs saw the same 2 batches' in out, out
    fp32 = re.search(r'^FP32 +([\d.]+) MiB +([\d.]+) -> ([\d.]+)', out, re.M)
    l3 = re.search(r'^L3 +([\d.]+) MiB \(([\d.]+)x less\) +([\d.]+) -> ([\d.]+)', out, re.M)
    assert fp32 and l3, out
    ratio = float(l3.group(2))
    assert ratio > 5, out  # about 2 bits per value instead of 32
    assert abs(float(fp32.group(1)) / float(l3.group(1)) / ratio - 1) < 0.05, out
    assert (tmp_path / 'loss.png').stat().st_size > 0
