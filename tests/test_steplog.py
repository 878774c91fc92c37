"""The step log: widths kept as given until asked, NaN/Inf flags checked once they arrive."""
import pytest
import torch

import actnn_mm
from actnn_mm.compress import codec
from actnn_mm.steplog import StepLog
from test_layers.qchecks import settings


def test_flags_raise_at_the_first_step_boundary_after_they_arrive():
    log = StepLog()
    log.watch(torch.tensor(False), 'QConv2d')
    log.watch(torch.tensor(True), 'QLinear')
    log.watch(torch.tensor(True), 'QBatchNorm2d')
    with pytest.raises(ValueError, match=r'kept by QLinear \(and 1 more\) had NaN or Inf'):
        log.begin_step()  # CPU values arrive at once
    log.begin_step()  # reported once
    log.watch(torch.tensor(False), 'QConv2d')
    log.begin_step()


def test_flags_of_fake_tensors_are_not_waited_for():
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = StepLog()
    for _ in range(3):
        with FakeTensorMode():
            log.watch(torch.ones((), dtype=torch.bool), 'QConv2d')
        log.begin_step()
    assert not log._arriving  # nothing to copy: nothing piles up


def test_a_layer_on_an_accelerator_reports_nan_at_a_later_step(monkeypatch):
    """Where reading the check would wait for the device, the layers neither check nor fail in
    the step; the next step's first save raises, naming the layer."""
    monkeypatch.setattr(codec, '_CHECKED_AT_ONCE', ())  # the CPU acts as an accelerator
    conv = actnn_mm.QModule(torch.nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    x[1, 0, 2, 2] = float('nan')
    with settings('L3'):
        conv(x.requires_grad_()).sum().backward()  # no error in the step
        with pytest.raises(ValueError, match='kept by QConv2d .* NaN or Inf'):
            conv(torch.randn(2, 3, 8, 8, requires_grad=True))
        conv(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()


def test_codec_checks_at_once_unless_deferred_on_an_accelerator(monkeypatch):
    x = torch.randn(3, 300)
    x[1, 7] = float('nan')
    with pytest.raises(ValueError, match=r'NaN or Inf.*1 of 3 samples, the first in sample 1'):
        codec.quantize(x, 2, defer_check=True)  # the CPU checks at once anyway
    monkeypatch.setattr(codec, '_CHECKED_AT_ONCE', ())
    with pytest.raises(ValueError, match='the first in sample 1'):
        codec.quantize(x, 2)
    c = codec.quantize(x, 2, defer_check=True)
    assert bool(codec.not_finite(c))
    assert not bool(codec.not_finite(codec.quantize(torch.zeros_like(x), 2)))
