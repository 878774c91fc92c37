"""The greedy bit allocation and the per-group range term."""
import itertools

import pytest
import torch

from actnn_mm.allocate import (BITS, _prefix_passes, allocate, allocate_samples, fan_in,
                               mean_square_range, sum_of_squares)


def _variance(sensitivity, bits):
    return float((sensitivity / (2.0**bits - 1) ** 2).sum())


def _average(bits, cost):
    return float((bits.double() * cost).sum() / cost.sum())


@pytest.mark.parametrize('k', [1, 2, 7, 64, 1000])
@pytest.mark.parametrize('budget', [1.0, 1.5, 2.0, 2.4, 4.0, 8.0])
def test_budget_holds(k, budget):
    g = torch.Generator().manual_seed(k)
    sensitivity = torch.rand(k, generator=g) ** 4 * 100
    cost = torch.randint(1, 1000, (k,), generator=g).double()
    bits = allocate(sensitivity, cost, budget)
    assert set(bits.tolist()) <= set(BITS)
    assert _average(bits, cost) <= budget + 1e-9


@pytest.mark.parametrize('k', [1, 3, 64, 65, 300])
def test_plain_python_path_matches_the_vectorised_one(k, monkeypatch):
    import actnn_mm.allocate as alloc
    monkeypatch.setattr(alloc, '_FEW_ITEMS', 0)  # allocate() takes the torch path
    g = torch.Generator().manual_seed(k)
    for trial in range(4):
        sensitivity = torch.rand(k, generator=g) ** 4
        sensitivity[::3] = 0  # ties
        cost = (torch.randint(1, 1000, (k,), generator=g).double() if trial % 2
                else torch.full((k,), 500.0))
        two_bits = (torch.rand(k, generator=g) < 0.3).tolist()
        for budget in (1.0, 1.7, 2.0, 3.3, 8.0):
            few = alloc._allocate_few(sensitivity.tolist(), cost.tolist(), budget, two_bits)
            assert torch.equal(few, allocate(sensitivity, cost, budget, two_bits)), (trial, budget)


@pytest.mark.parametrize('k', [0, 1, 2, 5, 16, 64, 200])
def test_samples_on_the_device_get_exactly_the_greedy_bits(k):
    """On a device, allocate_samples (tensor ops only, at most three prefix passes) gives
    allocate's bits for items of equal cost, ties and zero sensitivities included."""
    g = torch.Generator().manual_seed(k)
    for trial in range(6):
        sensitivity = torch.rand(k, generator=g) ** (1 + 4 * trial) * 10 ** (trial - 3)
        sensitivity[1::4] = sensitivity[0::4][:len(sensitivity[1::4])]  # ties
        sensitivity[::3] = 0
        for budget, two_bits in itertools.product((1.0, 1.25, 1.7, 2.0, 2.5, 3.3, 4.0, 7.9, 8.0),
                                                  (False, True)):
            bits = _prefix_passes(sensitivity, budget, two_bits)
            assert bits.dtype == torch.uint8
            assert torch.equal(bits, allocate_samples(sensitivity, budget, two_bits))
            assert torch.equal(bits.long(), allocate(sensitivity, torch.full((k,), 37.0),
                                                     budget, [two_bits] * k)), (trial, budget)


@pytest.mark.parametrize('budget', [1.0, 1.25, 1.5, 2.0, 3.0])
def test_items_that_need_two_bits_get_them_first(budget):
    """Flagged items take their second bit before any other upgrade, however insensitive, as
    far as the budget reaches; the budget still holds."""
    g = torch.Generator().manual_seed(0)
    sensitivity = torch.rand(40, generator=g) * torch.logspace(0, 6, 40)
    sensitivity[:10] = 1e-9  # the flagged items are the least sensitive
    sensitivity[0] = 0.0
    cost = torch.full((40,), 100.0)
    cost[:10] = 10.0
    two_bits = [True] * 10 + [False] * 30
    bits = allocate(sensitivity, cost, budget, two_bits)
    assert _average(bits, cost) <= budget + 1e-9
    spare = (budget - 1) * float(cost.sum())  # what upgrades may spend
    if spare >= float(cost[:10].sum()):
        assert bool((bits[:10] >= 2).all())
    else:
        assert bits[:10].tolist() == [2] * int(spare // 10) + [1] * (10 - int(spare // 10))


def test_fan_in_of_each_weighted_layer():
    assert fan_in(torch.nn.Conv2d(6, 8, 3, groups=2)) == 3 * 9
    assert fan_in(torch.nn.Linear(5, 7)) == 5
    # a transposed convolution's weight is (in, out / groups, *kernel): each output meets
    # in / groups channels of the kernel's taps
    assert fan_in(torch.nn.ConvTranspose2d(6, 8, (3, 2), groups=2)) == 3 * 6
    assert fan_in(torch.nn.ConvTranspose1d(4, 10, 5)) == 4 * 5


def test_full_budget_gives_every_item_eight_bits():
    assert allocate(torch.rand(10), torch.ones(10), 8.0).tolist() == [8] * 10


def test_minimum_budget_gives_one_bit():
    assert allocate(torch.rand(10), torch.ones(10), 1.0).tolist() == [1] * 10


def test_budget_below_one_bit_raises():
    with pytest.raises(ValueError, match='at least 1'):
        allocate(torch.rand(3), torch.ones(3), 0.5)


def test_more_sensitive_items_get_at_least_as_many_bits():
    sensitivity = torch.logspace(-3, 3, 50)
    bits = allocate(sensitivity, torch.ones(50), 2.0)
    assert torch.all(bits[1:] >= bits[:-1])
    assert bits[0] == 1 and bits[-1] >= 4


def test_better_than_uniform_and_close_to_optimal():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        sensitivity = torch.rand(5, generator=g) ** 3
        cost = torch.ones(5)
        bits = allocate(sensitivity, cost, 2.0)
        uniform = torch.full((5,), 2)
        assert _variance(sensitivity, bits) <= _variance(sensitivity, uniform) + 1e-12
        best = min(_variance(sensitivity, torch.tensor(c)) for c in itertools.product(BITS, repeat=5)
                   if sum(c) <= 10)
        assert _variance(sensitivity, bits) <= 1.5 * best + 1e-12


def test_deterministic_and_zero_sensitivity_safe():
    sensitivity = torch.tensor([0.0, 0.0, 1.0, 0.0])
    a = allocate(sensitivity, torch.ones(4), 2.0)
    assert torch.equal(a, allocate(sensitivity, torch.ones(4), 2.0))
    # 8 bits for the one sensitive item would cost 7 of the 4 spare bits: it gets 4, and the
    # spare bit goes to another item.
    assert a.tolist() == [2, 1, 4, 1]


def test_group_range_term():
    x = torch.zeros(2, 556)
    x[0, :256] = torch.linspace(0, 2, 256)   # ranges 2 and 0 in the two full groups
    x[1, 256:512] = torch.linspace(-1, 1, 256)
    x[1, 512:] = 100.0                       # the short tail group is not read
    assert torch.allclose(mean_square_range(x, 256), torch.tensor([2.0, 2.0], dtype=torch.float64))
    short = torch.tensor([[0.0, 3.0, 1.0]])   # shorter than a group: its own range
    assert torch.allclose(mean_square_range(short, 256), torch.tensor([9.0], dtype=torch.float64))
    cl = torch.randn(3, 8, 5, 7).to(memory_format=torch.channels_last)
    assert torch.allclose(mean_square_range(cl, 64), mean_square_range(
        cl.permute(0, 2, 3, 1).contiguous(), 64))
    assert mean_square_range(torch.randn(0, 5), 8).shape == (0,)
    # not dense (copied to contiguous first) and float64 (read as float32)
    strided = torch.randn(6, 40, 30)[::2, 3:, ::2]
    for x in (strided, strided.double(), strided.transpose(1, 2)):
        assert torch.allclose(mean_square_range(x, 16),
                              mean_square_range(x.contiguous().float(), 16))
        assert torch.allclose(sum_of_squares(x), x.double().pow(2).sum((1, 2)))


def test_estimates_from_evenly_spread_subsets():
    torch.manual_seed(0)
    x = torch.randn(4, 1000 * 256) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    lo, hi = x.view(4, 1000, 256).aminmax(dim=2)
    exact = (hi - lo).double().pow(2).mean(1)
    assert torch.allclose(mean_square_range(x, 256), exact, rtol=0.05)
    assert torch.allclose(sum_of_squares(x), x.double().pow(2).sum(1), rtol=0.05)
