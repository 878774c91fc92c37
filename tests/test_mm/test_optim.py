"""CPUAmpOptimWrapper: bfloat16 autocast in forward, plain float32 optimizer steps, and
tools/train.py --amp choosing it without a GPU."""
import argparse
import sys

import pytest
import torch
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

import actnn_mm
from test_layers.qchecks import settings
from test_mm.conftest import TOOLS


def test_forward_autocasts_to_bfloat16_and_the_step_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    wrapper = OPTIM_WRAPPERS.build(dict(
        type='CPUAmpOptimWrapper', optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    before = model[0].weight.detach().clone()
    with settings('L3'):
        actnn_mm.QModule(model)
        with wrapper.optim_context(model):
            out = model(torch.randn(2, 3, 8, 8))
        assert out.dtype == torch.bfloat16
        wrapper.update_params(out.float().square().mean())
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)
    assert not torch.is_autocast_enabled('cpu')


def test_only_bfloat16():
    with pytest.raises(ValueError, match='bfloat16'):
        OPTIM_WRAPPERS.build(dict(type='CPUAmpOptimWrapper', dtype='float16',
                                  optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1)))


def test_train_amp_flag_picks_it_on_the_cpu(tmp_path, monkeypatch):
    sys.path.insert(0, TOOLS)
    from train import build_config

    config = tmp_path / 'cls.py'
    config.write_text("_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n")
    args = argparse.Namespace(config=str(config), cfg_options=None, launcher='none',
                              work_dir=None, amp=True, auto_scale_lr=False, resume=None)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert build_config(args).optim_wrapper.type == 'CPUAmpOptimWrapper'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = build_config(args)
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 'dynamic')
