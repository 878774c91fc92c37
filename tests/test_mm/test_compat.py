"""Importing actnn_mm changes no behaviour of mmengine or mmcv; the fixes for the pinned stack
(:func:`actnn_mm.mm.compat_fixes`: resume under torch's ``weights_only`` default, mmcv's
``adjust_hue`` under numpy 2) hold while tools/train.py or the ActNNHook runs, and only then."""
import os
import subprocess
import sys

import mmcv
import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from actnn_mm.mm import compat_fixes, trusted_checkpoints
from test_mm.conftest import REPO, TOOLS

IMPORT_ONLY = """
import mmcv
import mmengine.registry as registries
import mmengine.runner  # noqa: F401  (its checkpoint loaders)
from mmengine.runner.checkpoint import CheckpointLoader, load_from_local
from mmcv.image.photometric import adjust_hue


def registered():
    return {{name: dict(r.module_dict) for name, r in vars(registries).items()
             if isinstance(r, registries.Registry)}}


before = registered()
import {module}  # noqa: E402
after = registered()
assert CheckpointLoader._schemes[''] is load_from_local
assert mmcv.adjust_hue is adjust_hue and mmcv.image.adjust_hue is adjust_hue
for name, entries in before.items():  # names added, none replaced
    assert all(after[name][key] is value for key, value in entries.items()), name
assert 'QConv2d' in after['MODELS'] and 'ActNNHook' in after['HOOKS']
print('unchanged')
"""


@pytest.mark.parametrize('module', ['actnn_mm', 'actnn_mm.mm'])
def test_import_changes_nothing_in_mmengine_or_mmcv(module):
    proc = subprocess.run([sys.executable, '-c', IMPORT_ONLY.format(module=module)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
    assert proc.returncode == 0 and 'unchanged' in proc.stdout, proc.stderr[-3000:]


def stack() -> tuple:
    """What the fixes change: mmengine's local checkpoint loader, mmcv's adjust_hue."""
    return CheckpointLoader._schemes[''], mmcv.adjust_hue, mmcv.image.adjust_hue


def full_checkpoint(path) -> str:
    """A file torch refuses to load with ``weights_only`` (as mmengine's message hub)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'message_hub': HistoryBuffer()}, path)
    return str(path)


def assert_fixes_hold(work_dir, elsewhere) -> None:
    """Inside the fixes: the work dir's checkpoints load, others stay weights-only, and mmcv's
    adjust_hue takes negative factors."""
    assert isinstance(CheckpointLoader.load_checkpoint(full_checkpoint(work_dir / 'iter_1.pth'))
                      ['message_hub'], HistoryBuffer)
    with pytest.raises(Exception, match='[Ww]eights only'):
        CheckpointLoader.load_checkpoint(full_checkpoint(elsewhere))
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert mmcv.adjust_hue(img, -0.1).shape == img.shape


def test_fixes_hold_inside_the_context_only_and_nest(tmp_path):
    original = stack()
    with pytest.raises(Exception, match='[Ww]eights only'):
        CheckpointLoader.load_checkpoint(full_checkpoint(tmp_path / 'work' / 'iter_1.pth'))
    with compat_fixes(str(tmp_path / 'work')):
        assert_fixes_hold(tmp_path / 'work', tmp_path / 'other' / 'iter_1.pth')
        with compat_fixes(str(tmp_path / 'work')), trusted_checkpoints(str(tmp_path / 'other')):
            assert_fixes_hold(tmp_path / 'work', tmp_path / 'third' / 'iter_1.pth')
            CheckpointLoader.load_checkpoint(str(tmp_path / 'other' / 'iter_1.pth'))
        assert_fixes_hold(tmp_path / 'work', tmp_path / 'other' / 'iter_1.pth')
    assert stack() == original


def test_train_py_runs_under_the_fixes(tmp_path, monkeypatch):
    sys.path.insert(0, TOOLS)
    import train

    config = tmp_path / 'config.py'
    config.write_text('model = dict()\n')
    work_dir = tmp_path / 'work'
    ran = []

    class Runner:
        def train(self) -> None:
            assert_fixes_hold(work_dir, tmp_path / 'other.pth')
            ran.append(True)

    original = stack()
    monkeypatch.setattr(train.Runner, 'from_cfg', lambda cfg: Runner())
    monkeypatch.setattr(sys, 'argv', ['train.py', str(config), '--work-dir', str(work_dir)])
    train.main()
    assert ran and stack() == original
