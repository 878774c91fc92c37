"""Fixtures of the OpenMMLab tests: the repository's paths and a small demo dataset."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET_DIR = os.path.join(REPO, 'configs', 'actnn')
TOOLS = os.path.join(REPO, 'tools')


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
