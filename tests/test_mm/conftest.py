"""Fixtures of the OpenMMLab tests: the repository's paths and a small demo dataset."""
import importlib.util
import os
import subprocess
import sys

import pytest

STACK_MISSING = [name for name in ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain')
                 if importlib.util.find_spec(name) is None]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET_DIR = os.path.join(REPO, 'configs', 'actnn')
TOOLS = os.path.join(REPO, 'tools')


@pytest.fixture(scope='session', autouse=True)
def openmmlab_stack():
    """Every test here needs the whole stack, some in the tools they run in subprocesses (session
    scope: set up before the module fixtures that start those)."""
    if STACK_MISSING:
        pytest.skip(f'needs {", ".join(STACK_MISSING)}, not installed')


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
    """COCO, Cityscapes and ImageNet demo data written once per session by
    tools/make_demo_data.py: 4 training and 2 validation images of 128 px per dataset
    (Cityscapes images are 128 x 256)."""
    out = tmp_path_factory.mktemp('demo_data')
    subprocess.run([sys.executable, os.path.join(TOOLS, 'make_demo_data.py'), str(out),
                    '--num-train', '4', '--num-val', '2', '--size', '128'],
                   check=True, capture_output=True, text=True)
    return out
