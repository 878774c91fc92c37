"""Shared checks of the layer tests: torch reference gradients, L0 equality, closeness at 8 bits
and unbiasedness at 2 bits (mean of K seeded backward passes against torch's gradient)."""
import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, List, Sequence

import pytest
import torch

import actnn_mm
from actnn_mm import config

# The devices the layer tests run on (the ``device`` fixture of conftest.py): the CUDA cases are
# collected everywhere and skipped without a GPU, so the CPU runs stay as they were.
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))]


def spy_quantize(monkeypatch) -> List[torch.dtype]:
    """Record the dtype of every activation the layers quantize (the list fills as they do)."""
    from actnn_mm.layers import saved

    seen: List[torch.dtype] = []
    quantize = saved.quantize
    monkeypatch.setattr(saved, 'quantize',
                        lambda t, *a, **k: seen.append(t.dtype) or quantize(t, *a, **k))
    return seen


@contextlib.contextmanager
def settings(level: str, **knobs: object) -> Iterator[None]:
    """Run under optimization ``level`` with ``knobs`` overridden; restore the config after."""
    saved = dataclasses.asdict(config)
    try:
        actnn_mm.set_optimization_level(level)
        for name, value in knobs.items():
            setattr(config, name, value)
        yield
    finally:
        config.level = saved.pop('level')
        for name, value in saved.items():
            setattr(config, name, value)


def grads(module: torch.nn.Module, inputs: Sequence[torch.Tensor],
          loss_weight: torch.Tensor = None, **kwargs: object) -> Dict[str, torch.Tensor]:
    """Output and gradients (inputs, parameters) of ``(module(*inputs) * loss_weight).sum()``.

    ``loss_weight`` (same shape as the output; random by default, seeded) makes the upstream
    gradient non-trivial; it is drawn on the CPU, so every device sees the same values.
    """
    inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    for p in module.parameters():
        p.grad = None
    out = module(*inputs, **kwargs)
    if loss_weight is None:
        loss_weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out.float() * loss_weight.to(out.device)).sum().backward()
    result = {'out': out.detach()}
    result.update({f'input{i}': x.grad for i, x in enumerate(inputs) if x.grad is not None})
    result.update({name: p.grad.clone() for name, p in module.named_parameters()
                   if p.grad is not None})
    return result


def assert_close_grads(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                       rtol: float, atol: float = 0.0) -> None:
    """Same keys, each tensor close in relative norm (``rtol``) or absolutely (``atol``); equal
    (infinities included) when both are 0."""
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        if rtol == atol == 0:
            assert torch.equal(got[key], want[key]), key
            continue
        err = (got[key].double() - want[key].double()).norm()
        scale = want[key].double().norm()
        assert err <= rtol * scale + atol, f'{key}: error {err:.3g} vs norm {scale:.3g}'


def assert_unbiased(sample: Callable[[], Dict[str, torch.Tensor]],
                    want: Dict[str, torch.Tensor], k: int = 64, keys: List[str] = None) -> None:
    """The mean of ``k`` samples of the gradients converges to ``want``.

    For each tensor: the error norm of the mean must be within 4 standard errors (estimated from
    the samples' per-element variance) and well below the error of a single sample.
    """
    runs = [sample() for _ in range(k)]
    for key in keys or [key for key in want if key != 'out']:
        stack = torch.stack([run[key].double() for run in runs])
        target = want[key].double()
        err = (stack.mean(0) - target).norm()
        std_err = (stack.var(0).sum() / k).sqrt()
        single = (stack - target).flatten(1).norm(dim=1).mean()
        assert single > 0, f'{key}: 2-bit gradients equal the exact ones (nothing compressed?)'
        assert err <= 4 * std_err + 1e-6 * target.norm(), \
            f'{key}: mean error {err:.3g} vs standard error {std_err:.3g}'
        assert err <= 0.5 * single, f'{key}: mean error {err:.3g} vs single-sample {single:.3g}'
