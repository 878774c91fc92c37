"""Fixtures of the layer tests."""
import pytest
import torch

from test_layers.qchecks import DEVICES


@pytest.fixture(autouse=True)
def layer_test_settings(single_thread, monkeypatch):
    """One intra-op thread (the tensors are tiny, and OpenMP barriers on a busy 2-core machine
    make each tiny op take milliseconds); float32 convolutions and matmuls on CUDA, not TF32,
    cuDNN's default: TF32 rounds the inputs to 10 bits in tensor-core algorithms only, which
    cuDNN may pick for one of two convolutions compared and not the other."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs its layers on: the CPU, and CUDA where there is a GPU (the CUDA
    cases are collected everywhere and skipped without one)."""
    return request.param
