"""The tools are scripts in tools/: make them importable, and keep their outputs out of the repo."""
import os
import sys

import pytest
import torch

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     'tools')
sys.path.insert(0, TOOLS)


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """Studies save their JSON and plots here instead of work_dirs/bench/."""
    import benchmark
    monkeypatch.setattr(benchmark, 'OUT_DIR', str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def restore_threads():
    """The studies set the number of intra-op threads: restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
