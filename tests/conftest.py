"""The core library needs torch alone; some tests also need packages it does not, the OpenMMLab
stack or the tools' dependencies. Where one of those is not installed (a bare GPU machine with
torch only), a test module or a test that imports it is skipped, at collection or when it runs,
with the package's name as the reason. Where they are installed, nothing changes: an import
error is an error."""
import importlib.util
from typing import Optional

import pytest

OPTIONAL = ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'sklearn', 'matplotlib', 'tqdm')
MISSING = frozenset(name for name in OPTIONAL if importlib.util.find_spec(name) is None)


def _skip_if_missing(error: Optional[BaseException], who: str = 'the test') -> None:
    """Skips the test, or the module at collection, when ``error`` is the import of an optional
    package that is not installed."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        package = error.name.partition('.')[0]
        if package in MISSING:
            pytest.skip(f'{who} needs {package}, which is not installed', allow_module_level=True)


class _Module(pytest.Module):

    def collect(self):
        try:
            return super().collect()
        except self.CollectError as error:  # what pytest makes of a failed import
            _skip_if_missing(error.__cause__, self.path.name)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    return _Module.from_parent(parent, path=module_path) if MISSING else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except ModuleNotFoundError as error:
        _skip_if_missing(error)
        raise


pytest_runtest_setup = pytest_runtest_call  # fixtures import too


@pytest.fixture
def single_thread():
    """torch on one thread for the test (results that must not depend on how work is split)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
