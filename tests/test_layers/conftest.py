"""Fixtures of the layer tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: the tensors are tiny, and OpenMP barriers on a busy 2-core machine
    make each tiny op take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
