"""Per-model state: each converted model owns its allocator, step log and sharing cache, and its
steps begin at its own forward, not inside a checkpoint's recomputation or another model's."""
import copy
import functools

import pytest
import torch
import torchvision
from torch.utils.checkpoint import checkpoint

import actnn_mm
from actnn_mm.layers.state import model_state, state_of, states_in
from qchecks import assert_unbiased, settings


def _net(with_cp: str = 'none') -> torch.nn.Module:
    """A small CNN whose middle block may run under torch.utils.checkpoint."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                            torch.nn.BatchNorm2d(8), torch.nn.ReLU())
            self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1),
                                             torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                             torch.nn.Conv2d(8, 8, 3, padding=1))
            self.head = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            if with_cp == 'none':
                x = self.block(x)
            else:
                x = checkpoint(self.block, x, use_reentrant=with_cp == 'reentrant')
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    return Net()


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    weight = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(1))
    (model(x) * weight).sum().backward()


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 12, 12, generator=g) * torch.logspace(-1, 1, 6).view(6, 1, 1, 1)


def test_a_converted_model_owns_its_state():
    a, b = actnn_mm.convert(_net())[0], actnn_mm.convert(_net())[0]
    assert len(states_in(a)) == len(states_in(b)) == 1
    assert model_state(a) is not model_state(b)
    assert all(state_of(m) is model_state(a) for m in a.modules()
               if isinstance(m, actnn_mm.layers.QLayer))
    assert model_state(copy.deepcopy(a)) is not model_state(a)  # a copy learns afresh
    actnn_mm.convert(a)
    assert len(states_in(a)) == 1  # converting again keeps it
    actnn_mm.revert(a)
    assert not states_in(a)


def _stats(with_cp: str) -> dict:
    model = actnn_mm.QModule(_net(with_cp))
    with settings('L3'):
        for _ in range(3):
            model.zero_grad()
            _step(model, _x().requires_grad_())
    return actnn_mm.stats(model)


def test_reentrant_checkpointing_keeps_the_step_and_its_stats():
    """The forward recomputed inside backward is part of the step: the allocator and the log
    are not reset mid-backward, so the stats match a run without checkpointing."""
    plain, cp = _stats('none'), _stats('reentrant')
    assert set(cp['layers']) == set(plain['layers'])
    for name, layer in plain['layers'].items():
        assert cp['layers'][name]['full_bytes'] == layer['full_bytes'], name
        assert cp['layers'][name]['calls'] == layer['calls'], name
    assert cp['full_precision_bytes'] == plain['full_precision_bytes']
    assert cp['compressed_bytes'] == pytest.approx(plain['compressed_bytes'], rel=0.05)
    assert cp['average_bits'] == pytest.approx(plain['average_bits'], abs=0.05)


def test_non_reentrant_checkpointing_keeps_its_region_as_torch_does():
    """A non-reentrant checkpoint drops what its region saves and recomputes it in backward:
    there the layers save as torch does (nothing of theirs is kept), outside nothing changes,
    and the recomputation is not counted again."""
    plain, cp = _stats('none'), _stats('non-reentrant')
    inside = {name for name in plain['layers'] if name.startswith('block.')}
    assert inside and set(cp['layers']) == set(plain['layers']) - inside | {'block.2'}
    assert cp['layers']['block.2'] == plain['layers']['block.2']  # ReLU's 1-bit mask, once
    for name in set(cp['layers']) - inside:
        assert cp['layers'][name]['full_bytes'] == plain['layers'][name]['full_bytes'], name
        assert cp['layers'][name]['calls'] == plain['layers'][name]['calls'], name


@pytest.mark.parametrize('with_cp', ['none', 'reentrant', 'non-reentrant'])
def test_unbiased_and_no_noisier_under_checkpointing(with_cp):
    x = _x()
    reference = _net('none')
    _step(reference, x)
    want = {'weight': torch.cat([p.grad.flatten() for p in reference.parameters()
                                 if p.dim() > 1])}
    model = actnn_mm.QModule(_net(with_cp))

    def sample():
        model.zero_grad()
        _step(model, x)
        return {'weight': torch.cat([p.grad.flatten() for p in model.parameters()
                                     if p.dim() > 1])}

    with settings('L3'):
        for _ in range(2):  # learn gradient magnitudes and layer budgets
            sample()
        assert_unbiased(sample, want, k=48)


def test_checkpointing_is_no_noisier():
    x = _x()

    def variance(with_cp: str) -> float:
        torch.manual_seed(0)
        model = actnn_mm.QModule(_net(with_cp))
        grads = []
        with settings('L3'):
            for i in range(26):
                model.zero_grad()
                _step(model, x)
                if i >= 2:
                    grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                            if p.dim() > 1]))
        stack = torch.stack(grads).double()
        return float(((stack - stack.mean(0)) ** 2).sum(1).mean())

    plain = variance('none')
    for with_cp in ('reentrant', 'non-reentrant'):
        assert variance(with_cp) <= 1.3 * plain, with_cp


def test_two_interleaved_models_keep_separate_budgets_and_stats():
    """A MoCo-like pair: a second model's forward and backward between the first one's do not
    begin a step of the first, and each allocator learns only its own layers."""
    x = _x()
    query, key = actnn_mm.QModule(_net()), actnn_mm.QModule(_net())
    with settings('L3'):
        for _ in range(3):
            out = query(x)
            _step(key, x * 0.5)
            (out * torch.randn_like(out)).sum().backward()
        solo = actnn_mm.QModule(_net())
        for _ in range(3):
            _step(solo, x)
    q, k = model_state(query).allocator, model_state(key).allocator
    assert set(q.layers).isdisjoint(k.layers)
    assert set(q.layers) == {m for m in query.modules() if isinstance(m, actnn_mm.layers.QLayer)
                             and type(m).__name__ != 'QReLU'}
    assert actnn_mm.stats(query)['layers'].keys() == actnn_mm.stats(solo)['layers'].keys()
    assert actnn_mm.stats(query)['full_precision_bytes'] == \
        actnn_mm.stats(solo)['full_precision_bytes']
    budgets = {name: state.budget for name, state in
               ((n, q.layers.get(m)) for n, m in query.named_modules()) if state is not None}
    assert any(b is not None and b != 2.0 for b in budgets.values())  # re-balanced per model


def test_several_forwards_before_one_backward_are_one_step():
    x = _x()
    model = actnn_mm.QModule(_net())
    with settings('L3'):
        _step(model, x)
        a, b = model(x), model(x * 2)
        (a.sum() + b.sum()).backward()
    assert actnn_mm.stats(model)['layers']['stem.0']['calls'] == 2


def test_resnet18_with_cp_at_l3_matches_the_stats_without():
    """As mmdet/mmpretrain's ``with_cp=True``: each residual block under a reentrant
    checkpoint."""
    x = torch.randn(2, 3, 32, 32)
    stats = {}
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=4)
        if with_cp:
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
                for block in layer:
                    block.forward = functools.partial(checkpoint, block.forward,
                                                      use_reentrant=True)
        actnn_mm.QModule(model)
        with settings('L3'):
            for _ in range(2):
                model(x.requires_grad_()).sum().backward()
        stats[with_cp] = actnn_mm.stats(model)
    assert stats[True]['full_precision_bytes'] == stats[False]['full_precision_bytes']
    assert stats[True]['compressed_bytes'] == pytest.approx(stats[False]['compressed_bytes'],
                                                            rel=0.05)
