"""CUDA-only checks (all skipped without a GPU; the layer families against torch on the GPU take
the ``device`` fixture in their own files): fp16/bf16 autocast, L4's
swap to pinned CPU memory and what it saves on the GPU, L5's expandable segments, generic mode,
and the same compressed bits on the CPU and on CUDA."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import actnn_mm
from actnn_mm.compress import codec
from actnn_mm.config import _ALLOC_CONF_VARS
from actnn_mm.layers import held_bytes, saved
from actnn_mm.layers.saved import Held
from qchecks import assert_close_grads, assert_unbiased, grads, settings, spy_quantize

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU'),
              pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")]
DEVICE = 'cuda'


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool-linear. The BatchNorm keeps its default affine map (1, 0), so that its
    output rounds to half precision as torch's does (a layer that keeps ``xh`` computes it, then
    ``xh * w + b``: two roundings, against one in torch's kernel); the max pool then picks torch's
    argmax (a half-precision near-tie flipped by a different rounding would move a gradient)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class MLPBlock(nn.Module):
    """A pre-norm transformer block's MLP half: LayerNorm, Linear, GELU, Linear, residual."""

    def __init__(self, dim=32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


# model: (build, input shape, gradients that depend on a compressed activation (the others are
# exact: single-sample noise 0), the dtypes quantized in one forward: None for the autocast dtype;
# the LayerNorm runs in float32 under CUDA autocast, as torch's does)
AUTOCAST_MODELS = {
    'cnn': (SmallCNN, (4, 3, 8, 8), ['input0', 'features.0.weight', 'features.1.weight',
                                     'head.weight'], [None, None, None]),
    'transformer': (MLPBlock, (4, 16, 32), ['input0', 'norm.weight', 'norm.bias', 'fc1.weight',
                                            'fc1.bias', 'fc2.weight'],
                    [torch.float32, None, None, None]),
}


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('name', list(AUTOCAST_MODELS))
def test_autocast(name, dtype, monkeypatch):
    """Activations are compressed in the autocast dtype, gradients have torch's dtypes, and L3's
    are unbiased against torch's (the 2-bit noise, 10-50% of a single gradient, dwarfs the
    half-precision rounding differences that remain between the two)."""
    build, shape, keys, quantized = AUTOCAST_MODELS[name]
    torch.manual_seed(0)
    ref = build().to(DEVICE)
    q = copy.deepcopy(ref)
    with settings('L3'):
        actnn_mm.convert(q)
    x = torch.randn(shape).to(DEVICE)
    seen = spy_quantize(monkeypatch)
    with torch.autocast(DEVICE, dtype=dtype):
        want = grads(ref, [x])
        with settings('L3'):
            got = grads(q, [x])
            assert seen == [dtype if t is None else t for t in quantized]
            assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
            assert_unbiased(lambda: grads(q, [x]), want, k=64, keys=keys)


class ResidualBlock(nn.Module):
    """ResNet's basic block (without downsampling)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(out)))


def small_resnet():
    """A ResNet-ish model, converted at L3: stem, max pool, two residual blocks, head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU(inplace=True), nn.MaxPool2d(2), ResidualBlock(16),
                          ResidualBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).to(DEVICE)
    with settings('L3'):
        return actnn_mm.convert(model)[0]


def held_in_graph(root):
    """What the ActNN layers of an autograd graph keep (the Held objects on its contexts)."""
    held, seen, todo = {}, set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held.update({id(v): v for v in getattr(node, '__dict__', {}).values()
                     if isinstance(v, Held)})
        todo.extend(next_node for next_node, _ in node.next_functions)
    return list(held.values())


def held_tensors(held):
    """The tensors a Held keeps: those of a compressed activation or packed integers."""
    value = held.value
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, codec.CompressedTensor):
        return [value.data, value.meta, value.sample_meta, value.bits, value.offsets]
    return [value.data]  # PackedInts


def swap_step(base, x, level):
    """One training step of a fresh copy of ``base`` at ``level`` with seeded rounding.

    Returns:
        the gradients; the GPU memory the forward pass left allocated; the bytes the layers
        hold then; and where they hold them (one Held per activation).
    """
    model = copy.deepcopy(base)  # the same weights, a fresh allocator
    weight = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with settings(level):
        torch.manual_seed(0)  # the same rounding noise
        torch.cuda.synchronize()
        start, start_held = torch.cuda.memory_allocated(), held_bytes()
        loss = (model(x) * weight).sum()
        torch.cuda.synchronize()  # the pinned copies have landed; nothing is in flight
        gpu, held = torch.cuda.memory_allocated() - start, held_bytes() - start_held
        kept = held_in_graph(loss.grad_fn)
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, gpu, held, kept


def test_l4_keeps_activations_in_pinned_memory(capsys, record_property):
    """L4 computes L3's gradients (the same seed: the same bits, copied to the CPU and back),
    what the layers hold during the step lives in pinned CPU memory, and the GPU holds less after
    forward by about those bytes (each GPU tensor is rounded up to 512 bytes by the caching
    allocator; the step log keeps the per-sample widths on the GPU)."""
    base, x = small_resnet(), torch.randn(16, 3, 64, 64).to(DEVICE)
    swap_step(base, x, 'L3')  # warm-up: cuBLAS's workspace and cuDNN's set-up stay allocated
    want, gpu_l3, held_l3, kept_l3 = swap_step(base, x, 'L3')
    got, gpu_l4, held_l4, kept_l4 = swap_step(base, x, 'L4')
    assert_close_grads(got, want, rtol=1e-6)
    assert len(kept_l4) == len(kept_l3) >= 15 and held_l4 == held_l3 > 0
    assert sum(h.value.nbytes for h in kept_l4) == held_l4
    assert all(h.device is None and t.is_cuda for h in kept_l3 for t in held_tensors(h))
    assert all(h.device is not None and h.device.type == DEVICE for h in kept_l4)
    assert all(t.device.type == 'cpu' and t.is_pinned() for h in kept_l4
               for t in held_tensors(h))
    saved_on_gpu = gpu_l3 - gpu_l4
    assert 0.9 * held_l4 <= saved_on_gpu <= 1.1 * held_l4 + 64 * 1024
    mib = 2.0**20
    with capsys.disabled():
        print(f'\nL4 on a small ResNet (batch 16, 64 px), GPU memory after forward: '
              f'{gpu_l3 / mib:.2f} MiB at L3, {gpu_l4 / mib:.2f} MiB at L4 '
              f'({held_l4 / mib:.2f} MiB of compressed activations in pinned CPU memory)')
    record_property('l3_forward_gpu_mib', round(gpu_l3 / mib, 3))
    record_property('l4_forward_gpu_mib', round(gpu_l4 / mib, 3))


def _train_step(model, x):
    """A training step (SGD); the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_l5_after_cuda_init_warns_and_still_trains(monkeypatch):
    """Too late for the allocator (it read its configuration when CUDA started): a warning, and
    L5 trains as L4 does."""
    torch.zeros(1, device=DEVICE)  # CUDA initialised
    for name in _ALLOC_CONF_VARS:  # so that the variables set below are restored afterwards
        monkeypatch.setenv(name, os.environ.get(name, ''))
    model = small_resnet()
    x = torch.randn(4, 3, 32, 32).to(DEVICE)
    with settings('L3'):
        with pytest.warns(UserWarning, match='already initialised'):
            actnn_mm.set_optimization_level('L5')
        assert actnn_mm.config.swap and actnn_mm.config.expandable_segments
        assert any('expandable_segments:True' in os.environ[name] for name in _ALLOC_CONF_VARS)
        losses = [_train_step(model, x) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert actnn_mm.stats(model)['compressed_bytes'] > 0


# Run in a fresh process: L5 (or the environment) sets the allocator's configuration before CUDA
# starts; prints what the process saw as JSON.
_L5_SCRIPT = textwrap.dedent('''
    import json, os, warnings
    import torch
    import actnn_mm
    from torch import nn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        actnn_mm.set_optimization_level('L5')
    model = actnn_mm.QModule(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                           nn.Flatten(), nn.Linear(8 * 30 * 30, 10)).cuda())
    big = torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda')  # a large-pool segment too
    loss = model(torch.randn(4, 3, 32, 32, device='cuda')).square().mean()
    loss.backward()
    torch.cuda.synchronize()
    print(json.dumps({
        'warnings': [str(w.message) for w in caught if 'expandable' in str(w.message)],
        'conf': [os.environ.get(name, '') for name in ('PYTORCH_ALLOC_CONF',
                                                       'PYTORCH_CUDA_ALLOC_CONF')],
        'expandable': [s.get('is_expandable') for s in torch.cuda.memory_snapshot()],
        'loss': loss.item(), 'swap': actnn_mm.config.swap}))
''')


@pytest.mark.parametrize('how', ['environment', 'level'])
def test_l5_in_a_fresh_process_uses_expandable_segments(how):
    """Started with ``PYTORCH_ALLOC_CONF=expandable_segments:True``, or with nothing set and
    ``set_optimization_level('L5')`` before any CUDA work: no warning, the allocator's segments
    are expandable (torch's memory snapshot says so per segment, where this torch reports it),
    and a training step runs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTORCH_ALLOC_CONF', 'PYTORCH_CUDA_ALLOC_CONF')}
    if how == 'environment':
        env['PYTORCH_ALLOC_CONF'] = 'expandable_segments:True'
    root = os.path.dirname(os.path.dirname(os.path.abspath(actnn_mm.__file__)))
    env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
    run = subprocess.run([sys.executable, '-c', _L5_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen['warnings'] == [] and seen['swap']
    assert 'expandable_segments:True' in seen['conf'][0]
    assert seen['expandable'] and seen['loss'] == seen['loss']  # not NaN
    if None not in seen['expandable']:  # this torch reports it per segment
        assert any(seen['expandable']), seen['expandable']


class LinearAttentionBlock(nn.Module):
    """A pre-norm transformer block whose attention has no softmax, so that each op's backward is
    linear in each tensor it saves (generic mode's gradients are then unbiased; a softmax output
    is read nonlinearly, see docs/generic.md): LayerNorm, q/k/v matmuls, Linear, GELU MLP."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)
        attn = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


def test_generic_mode_unbiased_on_a_transformer_block():
    """The layers and generic mode together (L3): gradients unbiased against torch's, and
    ``actnn_mm.stats`` reports what generic mode compressed."""
    torch.manual_seed(0)
    ref = LinearAttentionBlock().to(DEVICE)
    model = copy.deepcopy(ref)
    x = torch.randn(4, 16, 32).to(DEVICE)
    want = grads(ref, [x])

    def sample():
        with actnn_mm.compress_saved_tensors(model, min_bytes=0) as generic:
            result = grads(model, [x])
        return result, generic.stats

    with settings('L3'):
        actnn_mm.convert(model)  # the layers first, generic mode for the matmuls
        got, generic = sample()
        report = actnn_mm.stats(model)
        assert_unbiased(lambda: sample()[0], want, k=64,
                        keys=['input0', 'norm1.weight', 'qkv.weight', 'proj.weight',
                              'norm2.weight', 'mlp.0.weight', 'mlp.2.weight'])
    assert generic.compressed >= 4  # q, k, the attention, v
    assert report['generic']['calls'] == generic.compressed
    assert report['generic']['bytes'] == generic.saved_bytes < generic.full_bytes / 4
    assert report['generic']['full_bytes'] == generic.full_bytes
    assert report['compressed_bytes'] > report['generic']['bytes']  # the layers' too


# name: (torch layer, its ActNN class, input shape)
PARITY = {
    'conv2d': (lambda: nn.Conv2d(4, 6, 3, padding=1), actnn_mm.QConv2d, (3, 4, 9, 9)),
    'conv_transpose2d': (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), actnn_mm.QConvTranspose2d,
                         (3, 4, 5, 5)),
    'linear': (lambda: nn.Linear(40, 8), actnn_mm.QLinear, (6, 5, 40)),
}


@pytest.mark.parametrize('name', list(PARITY))
def test_cpu_and_cuda_keep_the_same_bits(name, monkeypatch):
    """With one seed (each device otherwise draws its own from its own generator), the CPU and
    CUDA kernels compress a layer's input to the same bytes, so its forward output and L2
    gradients agree up to the backends' rounding (oneDNN against cuDNN/cuBLAS in float32)."""
    monkeypatch.setattr(codec, '_draw_seed', lambda device: 0x5EED)
    kept = []
    quantize = saved.quantize
    monkeypatch.setattr(saved, 'quantize', lambda *a, **k: kept.append(quantize(*a, **k))
                        or kept[-1])
    build, cls, shape = PARITY[name]
    torch.manual_seed(0)
    layer, x = build(), torch.randn(shape)
    layer.__class__ = cls
    results = {}
    with settings('L2'):
        for device in ('cpu', DEVICE):
            results[device] = {k: v.cpu() for k, v in grads(copy.deepcopy(layer).to(device),
                                                            [x.to(device)]).items()}
    cpu, cuda = (c.to('cpu') for c in kept)
    for field in ('data', 'meta', 'sample_meta', 'bits', 'offsets'):
        assert torch.equal(getattr(cpu, field), getattr(cuda, field)), field
    assert_close_grads(results[DEVICE], results['cpu'], rtol=1e-5)
