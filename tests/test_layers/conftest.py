"""Fixtures of the layer tests."""
import pytest
import torch

from test_layers.qchecks import DEVICES  # by package: test_generic.py imports this conftest


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: the tensors are tiny, and OpenMP barriers on a busy 2-core machine
    make each tiny op take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs its layers on: the CPU, and CUDA where there is a GPU (the CUDA
    cases are collected everywhere and skipped without one)."""
    return request.param
