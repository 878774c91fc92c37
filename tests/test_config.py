"""The config object and the L0-L5 optimization levels."""
import os
import warnings

import pytest
import torch

import actnn_mm
from actnn_mm import config
from actnn_mm.compress.codec import statistics_bits
from actnn_mm.config import ADAPTIVE_BUDGET, LEVELS, Config
from test_layers.qchecks import settings

EXPECTED = {  # level: (compressed_layers, bits, adaptive, swap, expandable_segments)
    'L0': ('none', 8, False, False, False),
    'L1': ('conv', 4, False, False, False),
    'L2': ('all', 4, False, False, False),
    'L3': ('all', 2.0625, True, False, False),
    'L4': ('all', 2.0625, True, True, False),
    'L5': ('all', 2.0625, True, True, True),
}


@pytest.fixture
def alloc_env(monkeypatch):
    """No allocator configuration in the environment; restored after the test."""
    for name in ('PYTORCH_ALLOC_CONF', 'PYTORCH_CUDA_ALLOC_CONF'):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize('level', LEVELS)
def test_levels_set_every_knob(level, alloc_env):
    with settings('L0'):
        actnn_mm.set_optimization_level(level)
        got = (config.compressed_layers, config.bits, config.adaptive, config.swap,
               config.expandable_segments)
        assert config.level == level
        assert got == EXPECTED[level]
        assert config.activation_compression_bits == [EXPECTED[level][1]]
        assert config.group_size == 256 and config.stochastic


def test_default_is_l3():
    fresh = Config()
    assert fresh.level == 'L3'
    assert (fresh.compressed_layers, fresh.bits, fresh.adaptive, fresh.swap) == (
        'all', ADAPTIVE_BUDGET, True, False)


@pytest.mark.parametrize('bad', ['L6', 'l3', 3, None, 'O1', ['L3']])
def test_unknown_level_lists_valid_ones(bad):
    with settings('L2'):
        with pytest.raises(ValueError, match='L0, L1, L2, L3, L4, L5'):
            actnn_mm.set_optimization_level(bad)
        assert config.level == 'L2' and config.bits == 4


def test_assigning_level_applies_it():
    with settings('L3'):
        config.level = 'L1'
        assert config.compressed_layers == 'conv' and config.bits == 4


def test_compresses_by_family():
    with settings('L1'):
        assert config.compresses('conv') and not config.compresses('norm')
    with settings('L0'):
        assert not config.compresses('conv')
    with settings('L2'):
        assert all(config.compresses(f) for f in ('conv', 'linear', 'norm', 'relu'))


@pytest.mark.parametrize('name,value,error', [
    ('activation_compression_bits', [9], ValueError),
    ('activation_compression_bits', [0.5], ValueError),
    ('activation_compression_bits', [], ValueError),
    ('activation_compression_bits', 2, ValueError),
    ('activation_compression_bits', [True], ValueError),
    ('group_size', 100, ValueError),
    ('group_size', 0, ValueError),
    ('group_size', 256.0, ValueError),
    ('stochastic', 1, TypeError),
    ('swap', 'yes', TypeError),
    ('compressed_layers', 'bn', ValueError),
    ('adaptive', 1, TypeError),
    ('bitz', 2, AttributeError),
])
def test_bad_values_are_refused(name, value, error):
    with settings('L3'):
        with pytest.raises(error):
            setattr(config, name, value)
        assert (config.bits, config.group_size, config.stochastic, config.swap,
                config.compressed_layers, config.adaptive) == (ADAPTIVE_BUDGET, 256, True, False,
                                                               'all', True)


def test_knobs_can_be_set_one_by_one():
    before = (config.group_size, config.bits, config.stochastic)
    with settings('L3', group_size=64, activation_compression_bits=[8], stochastic=False):
        assert (config.group_size, config.bits, config.stochastic) == (64, 8, False)
    assert (config.group_size, config.bits, config.stochastic) == before


def test_l5_enables_expandable_segments_before_cuda(alloc_env):
    alloc_env.setattr(torch.cuda, 'is_initialized', lambda: False)
    with settings('L0'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            actnn_mm.set_optimization_level('L5')
        assert os.environ['PYTORCH_ALLOC_CONF'] == 'expandable_segments:True'
        assert 'PYTORCH_CUDA_ALLOC_CONF' not in os.environ


def test_l5_keeps_existing_allocator_settings(alloc_env):
    alloc_env.setattr(torch.cuda, 'is_initialized', lambda: False)
    alloc_env.setenv('PYTORCH_CUDA_ALLOC_CONF', 'max_split_size_mb:128')
    with settings('L5'):
        assert os.environ['PYTORCH_CUDA_ALLOC_CONF'] == \
            'max_split_size_mb:128,expandable_segments:True'
    alloc_env.setenv('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:False')
    with settings('L5'):  # the user's explicit choice wins
        assert os.environ['PYTORCH_CUDA_ALLOC_CONF'] == 'expandable_segments:False'


def test_l5_warns_when_cuda_is_initialised(alloc_env):
    alloc_env.setattr(torch.cuda, 'is_initialized', lambda: True)
    with settings('L0'):
        with pytest.warns(UserWarning, match='already initialised'):
            actnn_mm.set_optimization_level('L5')


def test_real_budgets_need_the_adaptive_allocator():
    with settings('L3'):
        actnn_mm.config.activation_compression_bits = [1.5]
        assert actnn_mm.config.bits == 1.5
        actnn_mm.config.activation_compression_bits = [3]
        with pytest.raises(ValueError, match='without it .* must be one of'):
            actnn_mm.config.adaptive = False
        actnn_mm.set_optimization_level('L2')  # the level's own width comes first
        assert actnn_mm.config.bits == 4 and not actnn_mm.config.adaptive
        with pytest.raises(ValueError, match='adaptive allocator'):
            actnn_mm.config.activation_compression_bits = [1.25]
        actnn_mm.config.activation_compression_bits = [2.0]  # a whole number is a width
        assert actnn_mm.config.bits == 2 and isinstance(actnn_mm.config.bits, int)
        for bad in ([0.5], [8.5], [True], ['2'], 1.5):
            with pytest.raises(ValueError, match='between 1 and 8'):
                actnn_mm.config.activation_compression_bits = bad


def test_budgets_that_leave_no_bit_for_the_values_raise():
    """At L3-L5 the budget includes the group statistics: it must leave 1 bit for the values,
    whatever setting changes last."""
    least = 1 + statistics_bits(256)
    with settings('L3'):
        actnn_mm.config.activation_compression_bits = [least]
        with pytest.raises(ValueError, match='less than 1 bit for the values'):
            actnn_mm.config.activation_compression_bits = [1.0]
        with pytest.raises(ValueError, match='less than 1 bit for the values'):
            actnn_mm.config.group_size = 64  # more statistics per value
        actnn_mm.config.activation_compression_bits = [2]
        actnn_mm.config.group_size = 64
        with pytest.raises(ValueError, match='less than 1 bit for the values'):
            actnn_mm.config.activation_compression_bits = [least]
    with settings('L2'):
        actnn_mm.config.activation_compression_bits = [1]  # a width: statistics on top
        with pytest.raises(ValueError, match='less than 1 bit for the values'):
            actnn_mm.config.adaptive = True


def test_generic_mode_spreads_a_real_budget_over_samples():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 8))
    x = torch.randn(16, 512) * torch.logspace(-2, 1, 16)[:, None]
    with settings('L3', activation_compression_bits=[1.5]):
        with actnn_mm.compress_saved_tensors(model, min_bytes=0):
            model(x).sum().backward()
        s = actnn_mm.stats(model)
    generic = s['generic']
    assert generic['calls'] > 0 and generic['bits_min'] < generic['bits_max']
    # the budget includes the group statistics (of rows of 512 values here)
    assert generic['bits_mean'] <= 1.5 - statistics_bits(256, 512) + 1e-9
    assert s['average_bits'] + s['statistics_bits'] <= 1.5 + 1e-9
