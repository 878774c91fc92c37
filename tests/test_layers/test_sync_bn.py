"""QSyncBatchNorm across two processes (gloo, on the CPU and on one GPU shared by both) against
BatchNorm on the concatenated batch."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import actnn_mm
from qchecks import DEVICES, settings

WORLD = 2
SCENARIOS = {  # name: (level overrides, BatchNorm kwargs, channels_last, dtype)
    'l0': (dict(level='L0'), {}, False, torch.float32),
    'l0_cumulative_no_affine': (dict(level='L0'), dict(momentum=None, affine=False), False,
                                torch.float32),
    'l0_untracked_channels_last': (dict(level='L0'), dict(track_running_stats=False), True,
                                   torch.float32),
    '8bit': (dict(level='L2', activation_compression_bits=[8]), {}, False, torch.float32),
    '8bit_bf16': (dict(level='L2', activation_compression_bits=[8]), {}, False, torch.bfloat16),
}
STEPS = 2


def _data(name):
    """Full-batch inputs and loss weights of each step, the same in every process."""
    _, _, channels_last, dtype = SCENARIOS[name]
    gen = torch.Generator().manual_seed(1)
    xs = [(torch.randn(6, 3, 4, 5, generator=gen) * 2 + 1).to(dtype) for _ in range(STEPS)]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    weights = [torch.randn(6, 3, 4, 5, generator=gen) for _ in range(STEPS)]
    return xs, weights


def _make(cls, name):
    torch.manual_seed(0)
    bn = cls(3, **SCENARIOS[name][1])
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def _run(bn, xs, weights, part, device):
    """Outputs and gradients of STEPS training steps of ``bn`` (on ``device``) on slice ``part``
    of the batch, on the CPU."""
    results = []
    for x, weight in zip(xs, weights):
        x = x[part].to(device).detach().requires_grad_()
        bn.zero_grad()
        out = bn(x)
        (out.float() * weight[part].to(device)).sum().backward()
        results.append({'out': out.detach().cpu(), 'input': x.grad.cpu(),
                        **{n: p.grad.to('cpu', copy=True) for n, p in bn.named_parameters()}})
    with torch.no_grad():  # a statistics update without autograd syncs too
        bn(xs[0][part].to(device))
    return results, {n: b.to('cpu', copy=True) for n, b in bn.named_buffers()}


def _worker(rank, init_file, out_dir, device):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=WORLD)
    try:
        results = {}
        for name, (knobs, _, _, _) in SCENARIOS.items():
            knobs = dict(knobs)
            with settings(knobs.pop('level'), **knobs):
                xs, weights = _data(name)
                bn = _make(actnn_mm.QSyncBatchNorm, name).to(device)
                part = slice(rank * 3, rank * 3 + 3)
                results[name] = _run(bn, xs, weights, part, device)
        torch.save(results, os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module', params=DEVICES)
def synced(request, tmp_path_factory):
    """The device, and the results of every scenario from both processes on it:
    {rank: {scenario: (steps, buffers)}}."""
    device = request.param
    tmp = tmp_path_factory.mktemp('sync_bn')
    context = mp.start_processes(_worker, args=(str(tmp / 'init'), str(tmp), device),
                                 nprocs=WORLD, join=False, start_method='spawn')
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail('QSyncBatchNorm processes did not finish (deadlock?)')
    return device, {rank: torch.load(tmp / f'{rank}.pt') for rank in range(WORLD)}


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_matches_batchnorm_on_concatenated_batch(synced, name):
    device, synced = synced
    xs, weights = _data(name)
    ref = _make(nn.BatchNorm2d, name).to(device)
    want, want_buffers = _run(ref, xs, weights, slice(None), device)
    exact = SCENARIOS[name][0]['level'] == 'L0'
    rtol = 1e-5 if exact else 3e-2
    for step in range(STEPS):
        got = [synced[rank][name][0][step] for rank in range(WORLD)]
        full = {'out': torch.cat([g['out'] for g in got]),
                'input': torch.cat([g['input'] for g in got])}
        # parameter gradients stay local, as in torch's SyncBatchNorm: DDP sums them
        full.update({k: sum(g[k] for g in got) for k in got[0] if k not in full})
        assert full.keys() == want[step].keys()
        for key, value in want[step].items():
            assert full[key].dtype == value.dtype, key
            err = (full[key].double() - value.double()).norm()
            tol = 1e-2 if value.dtype == torch.bfloat16 and key in ('out', 'input') else rtol
            assert err <= tol * value.double().norm() + 1e-6, f'step {step} {key}: {err:.3g}'
    for rank in range(WORLD):
        buffers = synced[rank][name][1]
        assert buffers.keys() == want_buffers.keys()
        for key, value in want_buffers.items():
            assert torch.allclose(buffers[key].double(), value.double(), rtol=1e-5,
                                  atol=1e-6), key
