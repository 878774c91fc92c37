"""ActNN under OpenMMLab's activation checkpointing: mmpretrain's ``with_cp=True`` and mmengine's
``activation_checkpointing`` key. Their recomputation inside backward is part of the step: the
stats are those of the same model without checkpointing, and the gradients stay unbiased."""
import pytest
import torch

import actnn_mm
from test_layers.qchecks import assert_unbiased, settings


def _resnet(with_cp: bool) -> torch.nn.Module:
    from mmpretrain.models.backbones import ResNet

    torch.manual_seed(0)
    return torch.nn.Sequential(ResNet(depth=18, base_channels=8, with_cp=with_cp,
                                      out_indices=(3,)),
                               _First(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(64, 5))


class _First(torch.nn.Module):
    def forward(self, outs: tuple) -> torch.Tensor:
        return outs[0]


def _activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    from mmengine.runner import turn_on_activation_checkpointing

    turn_on_activation_checkpointing(model, [f'0.layer{i}' for i in range(1, 5)])
    return model


MODELS = {'plain': lambda: _resnet(False), 'with_cp': lambda: _resnet(True),
          'activation_checkpointing': lambda: _activation_checkpointing(_resnet(False))}
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _grads(model: torch.nn.Module) -> dict:
    model.zero_grad()
    out = model(X.requires_grad_())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return {'weight': torch.cat([p.grad.flatten() for p in model.parameters() if p.dim() > 1])}


@pytest.mark.filterwarnings('ignore:torch.utils.checkpoint')  # OpenMMLab's calls, not ours
@pytest.mark.parametrize('name', ['with_cp', 'activation_checkpointing'])
def test_checkpointed_resnet_at_l3(name):
    stats = {}
    for key in ('plain', name):
        model = actnn_mm.QModule(MODELS[key]())
        with settings('L3'):
            for _ in range(2):
                _grads(model)
        stats[key] = actnn_mm.stats(model)
    assert stats[name]['layers'].keys() == stats['plain']['layers'].keys()
    assert stats[name]['full_precision_bytes'] == stats['plain']['full_precision_bytes']
    assert stats[name]['compressed_bytes'] == pytest.approx(stats['plain']['compressed_bytes'],
                                                            rel=0.05)

    want = _grads(MODELS['plain']())
    with settings('L3'):
        assert_unbiased(lambda: _grads(model), want, k=24)
