"""A training step reads nothing back from the GPU, at L2 and L3, layers and generic mode.

Each read of device memory on the host (``.item()``, ``.tolist()``, ``.cpu()``, a tensor made
from a list) makes the host wait for every kernel queued before it. On the CPU this is caught with
fake tensors (no GPU needed): the ops' fake implementations serve and a read of a value raises
DataDependentOutputException. Fake 'cuda' tensors serve the forward pass; autograd's engine needs
a real GPU for their backward, so whole steps run on fake 'meta' tensors, which take the same
paths (everything but the CPU's). On a GPU the same steps run under
``torch.cuda.set_sync_debug_mode('error')``.
"""
import contextlib
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch._subclasses.fake_tensor import FakeTensorMode

import actnn_mm
from actnn_mm.compress import extension_loaded
from test_layers.qchecks import settings

pytestmark = pytest.mark.skipif(not extension_loaded(), reason='C++ extension not built')


def _cnn() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _transformer() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=10)


def _train(model: torch.nn.Module, generic: bool, steps: int = 2,
           backward: bool = True) -> None:
    """Convert ``model`` and train it on random data made on the default device."""
    model = actnn_mm.QModule(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        mode = actnn_mm.compress_saved_tensors(model) if generic else contextlib.nullcontext()
        with mode:
            loss = F.cross_entropy(model(images), labels)
        if backward:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@contextlib.contextmanager
def _fake(model: torch.nn.Module, device: str) -> Iterator[torch.nn.Module]:
    """``model`` on fake tensors on ``device``, also made by default inside; the ops' fake
    implementations serve them (the kernels themselves read nothing back). Models are built
    outside: their initialisation reads values."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device(device):
        yield model.to(device)


CASES = [(_cnn, False), (_transformer, False), (_transformer, True)]
IDS = ['cnn', 'transformer', 'transformer-generic']


@pytest.mark.parametrize('level', ['L2', 'L3'])
@pytest.mark.parametrize('build, generic', CASES, ids=IDS)
def test_steps_read_nothing_from_fake_tensors(build, generic, level):
    with settings(level), _fake(build(), 'meta') as model:
        _train(model, generic)


@pytest.mark.parametrize('level', ['L2', 'L3'])
@pytest.mark.parametrize('build, generic', CASES, ids=IDS)
def test_forward_reads_nothing_from_a_fake_gpu(build, generic, level):
    with settings(level), _fake(build(), 'cuda') as model:
        _train(model, generic, backward=False)


def test_a_read_would_be_caught(monkeypatch):
    """The check above fails if a read comes back (here: the widths read when logged)."""
    from actnn_mm.steplog import StepLog

    record = StepLog.record

    def reading_record(self, module, nbytes, full_bytes, widths=None, sample_elements=0,
                       statistics_bytes=0):
        if widths is not None:
            widths.tolist()  # what the log did before it kept the widths on their device
        record(self, module, nbytes, full_bytes, widths, sample_elements, statistics_bytes)

    monkeypatch.setattr(StepLog, 'record', reading_record)
    with settings('L3'), _fake(_cnn(), 'meta') as model, \
            pytest.raises(torch._subclasses.fake_tensor.DataDependentOutputException):
        _train(model, False, steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('level', ['L2', 'L3'])
@pytest.mark.parametrize('build, generic', CASES, ids=IDS)
def test_steps_do_not_wait_for_the_gpu(build, generic, level):
    with settings(level), torch.device('cuda'):
        _train(build(), generic, steps=1)  # warm-up: cuDNN/cuBLAS set-up may synchronise
        model = build()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            _train(model, generic)
        finally:
            torch.cuda.set_sync_debug_mode('default')
